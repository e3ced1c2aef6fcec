"""What each rank runs in tests/parallel/test_serve_ranks.py's in-process cases (imported by the
spawned processes: moekit only, so that a rank starts quickly)."""

from __future__ import annotations


def scheduler_in_lockstep(comm, path: str, ep: int, tp: int, requests: list[tuple[list[int], int]],
                          warm: bool, static_decode: bool) -> dict:
    """Rank 0: returns {"outputs": each request's greedy tokens, "steps": steps broadcast, "static":
    static decode steps run} of a Scheduler (warmed first with `warm`; decode-only steps at static
    shapes with `static_decode`, run eagerly on the CPU) that a StepMirror is attached to; the
    other ranks: {"steps": steps they followed}."""
    from moekit.parallel.serve_ranks import StepMirror, follow
    from moekit.parallel.tensor import ParallelGroups, load_parallel
    from moekit.serve.scheduler import SamplingParams, Scheduler, SchedulerConfig

    model = load_parallel(path, ParallelGroups.create(comm, ep, tp))
    if comm.rank != 0:
        return {"steps": follow(model, comm)}
    mirror = StepMirror(model, comm)
    try:
        scheduler = Scheduler(model, SchedulerConfig(max_seqs=3, max_step_tokens=24, static_decode=static_decode,
                                                     overlap=False))
        mirror.attach(scheduler)
        if warm:
            scheduler.warm()
        added = [scheduler.add(prompt, SamplingParams(max_tokens=n)) for prompt, n in requests]
        scheduler.run()
    finally:
        mirror.stop()
    return {"outputs": [r.output for r in added], "steps": mirror.steps, "static": scheduler.stats.static_steps}
