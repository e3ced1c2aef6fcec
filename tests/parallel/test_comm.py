"""ExpertComm's waits: on CUDA (NCCL) a collective is waited on without a timeout, which only orders
the current stream after it (a timeout would block the host until the collective ends: a sync per
layer); on the CPU (gloo) with the group's timeout. Fake work objects, no process group."""

from __future__ import annotations

import pytest
import torch

from moekit.errors import MoekitError
from moekit.parallel import ExpertComm


class FakeWork:
    def __init__(self, fail: BaseException | None = None, done: bool = True):
        self.calls: list[tuple] = []
        self.fail, self.done = fail, done

    def wait(self, *args):
        self.calls.append(args)
        if self.fail is not None:
            raise self.fail
        return self.done


def test_cuda_wait_orders_the_stream_without_a_host_timeout():
    comm = ExpertComm(0, 2, torch.device("cuda", 0), timeout_s=7.0)  # nothing touches the device
    work = FakeWork()
    comm._wait(work, "the exchange of layer 3")
    assert work.calls == [()]  # wait(): stream-ordered; wait(timeout) would block the host


def test_cpu_wait_uses_the_group_timeout():
    comm = ExpertComm(0, 2, torch.device("cpu"), timeout_s=7.0)
    work = FakeWork()
    comm._wait(work, "the exchange of layer 3")
    assert [c[0].total_seconds() for c in work.calls] == [7.0]
    with pytest.raises(MoekitError, match=r"rank 0 of 2: the exchange of layer 3 failed \(no answer in 7 s\)"):
        comm._wait(FakeWork(done=False), "the exchange of layer 3")


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_a_failed_collective_names_the_rank_and_what_it_did(device):
    comm = ExpertComm(1, 2, torch.device(device), timeout_s=5.0)
    with pytest.raises(MoekitError, match=r"rank 1 of 2: the attention all-reduce of layer 0 failed "
                                          r"\(NCCL error: remote process exited\); another rank exited"):
        comm._wait(FakeWork(RuntimeError("NCCL error: remote process exited\nmore")), "the attention all-reduce of layer 0")
