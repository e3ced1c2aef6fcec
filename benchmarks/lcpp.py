"""llama.cpp as bench_llamacpp's peer: its build (the anchor's run.sh, then llama-quantize), the GGUF
conversion and quantization of one checkpoint, and llama-bench rows with the GPU memory they used.

The anchor (../shared/anchors/llamacpp, copied into the git-ignored .anchors/llamacpp) builds in
$LCPP_ROOT (/tmp/lcpp): run.sh skips the build when llama-bench is there and ninja resumes a build cut
short, so a second call on a machine still warm builds nothing. llama-quantize is built after
llama-bench from the same build folder (its libraries are shared: one more file to compile).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import common

QUANT_TYPES = {"int4": "Q4_K_M", "int2": "Q2_K"}  # moekit's form -> llama-quantize's type of the same bits


class GpuMemorySampler:
    """Samples nvidia-smi's memory.used (MiB) every 50 ms in the background; `peak_mib` after exit."""

    def __init__(self):
        self.proc = None
        self.peak_mib = None

    def __enter__(self):
        self.proc = subprocess.Popen(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                                      "-lms", "50"], stdout=subprocess.PIPE, text=True)
        return self

    def __exit__(self, *exc):
        self.proc.terminate()
        out, _ = self.proc.communicate(timeout=10)
        values = [int(v) for v in out.split() if v.strip().isdigit()]
        self.peak_mib = max(values) if values else None

    @staticmethod
    def used_mib() -> int | None:
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=30, check=False).stdout
            return int(out.split()[0])
        except (OSError, ValueError, IndexError, subprocess.SubprocessError):
            return None


class Nothing:
    """A context that does nothing (no GPU to sample)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def llama_env(binary: Path) -> dict:
    """Returns the environment a llama.cpp binary needs (pip's CUDA libraries when the system lacks them)."""
    env = dict(os.environ)
    missing = "not found" in subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=False).stdout
    if missing:
        import glob

        try:
            import nvidia

            dirs = sorted({os.path.dirname(p) for r in nvidia.__path__ for p in glob.glob(os.path.join(r, "*", "lib", "lib*.so*"))})
            env["LD_LIBRARY_PATH"] = ":".join(dirs + [env.get("LD_LIBRARY_PATH", "")])
        except ImportError:
            pass
    return env


def free_bytes(folder: Path) -> int:
    """Returns the bytes free on the file system holding `folder` (its nearest existing parent)."""
    while not folder.exists():
        folder = folder.parent
    return shutil.disk_usage(folder).free


class LlamaCpp:
    """One checkpoint's llama.cpp: build + convert (started in the background), quantize, and
    llama-bench rows recorded into results['llamacpp'] = {'rows': {name: row}, ...}.

    ggufs: {"bf16": path, "Q4_K_M": path, ...}; bf16 comes from run.sh's convert stage."""

    def __init__(self, anchor: Path, shape: str, work: Path, log: Path, cuda: bool, results: dict, save):
        """work: run.sh's scratch folder (its logs, outside $OUT: only 8 files come back from there);
        log: the one file that gathers run.sh's output and its logs' tails."""
        self.anchor, self.shape, self.out, self.log, self.cuda, self.save = anchor, shape, work, log, cuda, save
        work.mkdir(parents=True, exist_ok=True)
        self.root = Path(os.environ.get("LCPP_ROOT", "/tmp/lcpp"))
        self.bin = self.root / "llama.cpp" / ("build-cuda" if cuda else "build-cpu") / "bin"
        self.gguf_dir = self.root / "gguf"
        self.ggufs = {"bf16": self.gguf_dir / f"{shape}-bf16.gguf"}
        self.lc = results.setdefault("llamacpp", {"rows": {}})
        self.idle_mib = None
        self.procs: dict[str, subprocess.Popen] = {}
        self.bin_tarball: Path | None = None  # a prebuilt bin/ (import_build)
        self.ok = False

    # ---- build and convert ----------------------------------------------------------------------

    def _run_sh(self, stages: str, hf_dir: Path, name: str) -> subprocess.Popen:
        """Starts the anchor's run.sh with LCPP_STAGES=stages in the background, its output in out/name.log."""
        log = open(self.out / f"{name}.log", "w")  # noqa: SIM115 -- closed with the process
        env = {**os.environ, "PYTHONPATH": ":".join(filter(None, [self._sentencepiece_stub(), os.environ.get("PYTHONPATH")])),
               "LCPP_STAGES": stages, "LCPP_CUDA": "1" if self.cuda else "0",
               "LCPP_ROOT": str(self.root), "LCPP_GGUF": str(self.ggufs["bf16"]),
               "LCPP_PY": os.environ.get("LCPP_PY", sys.executable)}  # the converter needs torch + transformers
        if self.bin_tarball is not None:  # run.sh unpacks it into the build's bin/ instead of building
            env["LCPP_BIN_TARBALL"] = str(self.bin_tarball)
        return subprocess.Popen(["bash", str(self.anchor / "run.sh"), str(hf_dir), str(self.out / name)],
                                stdout=log, stderr=subprocess.STDOUT, env=env)

    def start_build(self) -> None:
        """Starts run.sh's build stage in the background (a CPU-only build when not cuda): before the
        checkpoint exists, so that writing it overlaps the build (run.sh only asks for a config.json)."""
        stub = self.out / "llamacpp_build_input"
        stub.mkdir(parents=True, exist_ok=True)
        (stub / "config.json").write_text("{}")
        self.t0 = time.perf_counter()
        self.procs["build"] = self._run_sh("build", stub, "llamacpp_build")

    def start_convert(self, ckpt: Path, gguf_dir: Path) -> None:
        """Starts run.sh's convert stage of `ckpt` to gguf_dir/<shape>-bf16.gguf in the background
        (skipped by run.sh when that GGUF's stamp matches the checkpoint); other GGUFs there go."""
        self.gguf_dir = gguf_dir
        self.ggufs = {"bf16": gguf_dir / f"{self.shape}-bf16.gguf"}
        gguf_dir.mkdir(parents=True, exist_ok=True)
        for folder in {gguf_dir, self.root / "gguf", self.root}:  # another call's GGUFs: memory and disk the run needs
            for old in folder.glob("*.gguf*") if folder.exists() else ():
                if not (folder == gguf_dir and old.name.startswith(self.ggufs["bf16"].name)):
                    old.unlink()
        build_log = self.out / "llamacpp_build.log"
        deadline = time.perf_counter() + 300
        while "build" in self.procs and self.procs["build"].poll() is None and time.perf_counter() < deadline:
            if "stage build" in build_log.read_text():  # the source is extracted: two extractions would race
                break
            time.sleep(0.5)
        self.procs["convert"] = self._run_sh("convert", ckpt, "llamacpp_convert")

    def _sentencepiece_stub(self) -> str | None:
        """Returns a folder holding a stand-in `sentencepiece` module when the real one is missing, or
        None. The converter's Llama path (Mixtral) imports sentencepiece before it looks for a
        tokenizer.model, so without the module it fails instead of falling back to tokenizer.json;
        the stand-in lets the import pass and the missing file send it to that fallback."""
        import importlib.util

        if importlib.util.find_spec("sentencepiece") is not None:
            return None
        stub = self.out / "pystub" / "sentencepiece"
        stub.mkdir(parents=True, exist_ok=True)
        (stub / "__init__.py").write_text(
            '"""Stand-in written by benchmarks/lcpp.py: the checkpoints it converts have no tokenizer.model."""\n\n\n'
            "class SentencePieceProcessor:\n"
            "    def __init__(self, *args, **kwargs):\n"
            "        raise FileNotFoundError('sentencepiece is not installed (stand-in module)')\n")
        return str(stub.parent)

    def wait(self) -> bool:
        """Waits for build and convert, then builds llama-quantize; returns whether llama-bench and the
        bf16 GGUF are ready (the error is in results['llamacpp']['error']; llama-quantize's in 'quantize_error')."""
        failed = []
        for stage, proc in self.procs.items():
            rc = proc.wait()
            self.lc[f"{stage}_done_s"] = time.perf_counter() - self.t0  # since the build started
            timings = self.out / f"llamacpp_{stage}" / "timings.txt"
            if timings.exists():  # run.sh's own stage times: "build 212.3", "convert 30.1"
                self.lc.setdefault("stages_s", {}).update(
                    {k: float(v) for k, v in (line.split() for line in timings.read_text().splitlines())})
            if rc != 0:
                failed.append(f"run.sh {stage} failed (rc {rc}): {(self.out / f'llamacpp_{stage}.log').read_text()[-1500:]}")
        self.lc["build_convert_s"] = time.perf_counter() - self.t0
        self.gather_logs()
        if failed:
            self.lc["error"] = "\n".join(failed)
            common.log(self.lc["error"])
            self.save()
            return False
        t0 = time.perf_counter()
        build = self.bin.parent
        q = subprocess.CompletedProcess([], 0, "", "")  # built already (as run.sh skips a built llama-bench)
        if not (self.bin / "llama-quantize").exists():
            q = subprocess.run(["cmake", "--build", str(build), "-j", str(os.cpu_count()), "--target", "llama-quantize"],
                               capture_output=True, text=True, check=False)
        self.lc["quantize_build_s"] = time.perf_counter() - t0
        if q.returncode != 0 or not (self.bin / "llama-quantize").exists():  # the bf16 rows can still run
            self.lc["quantize_error"] = f"llama-quantize build failed (rc {q.returncode}): {(q.stdout + q.stderr)[-1500:]}"
            common.log(self.lc["quantize_error"])
        common.log(f"llama.cpp built and converted in {self.lc['build_convert_s']:.0f} s "
                   f"(stages {self.lc.get('stages_s')}), llama-quantize in {self.lc['quantize_build_s']:.0f} s")
        if self.cuda:  # this process's context and tensors count as idle, its allocator's cache does not
            common.free_memory("cuda")
            self.idle_mib = GpuMemorySampler.used_mib()
        self.lc["idle_used_mib"] = self.idle_mib
        self.ok = True
        return True

    def gather_logs(self) -> None:
        """Writes run.sh's output of each stage and the last lines of its build / convert logs to self.log."""
        parts = []
        for stage in self.procs:
            parts.append(f"===== run.sh {stage} =====\n" + (self.out / f"llamacpp_{stage}.log").read_text())
            for name in ("build.log", "convert.log", "convert.out"):
                p = self.out / f"llamacpp_{stage}" / name
                if p.exists():
                    parts.append(f"----- tail of {stage}/{name} -----\n" + "\n".join(p.read_text().splitlines()[-40:]))
        self.log.write_text("\n".join(parts) + "\n")

    # ---- a build carried from one call to the next ---------------------------------------------------

    def export_build(self, dest: Path, part_bytes: int = 15 * 2**20, max_bytes: int = 48 * 2**20) -> list[Path]:
        """Returns the parts (dest/lcpp-bin.txz.NN, part_bytes each: a device call brings back files
        of 16 MiB at most) of an xz-compressed tar of the build's bin/ (llama-bench, llama-quantize and
        their libraries), or [] when it is over max_bytes (what is carried travels under 64 MiB: a copy
        of the tree without examples/tiny-moe's weights, ~6 MB, the anchor's 4 MB and these parts); the
        next call carries them (import_build), under the same $LCPP_ROOT (the binaries' RUNPATH names
        the build folder). xz, not gzip: the CUDA build's 87 MB were 44 MiB gzipped (a9a7ba5), 40.4 MiB
        xz'd at -6 (37f80b6); `xz -T0` uses every core."""
        import io
        import lzma
        import tarfile

        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            tar.add(self.bin, arcname="bin")
        raw = buf.getvalue()
        t0 = time.perf_counter()
        xz = shutil.which("xz")
        if xz:
            data = subprocess.run([xz, "-T0", "-6", "-c"], input=raw, capture_output=True, check=True).stdout
        else:
            data = lzma.compress(raw, preset=6)
        info = self.lc["export_build"] = {"bytes": len(data), "uncompressed_bytes": len(raw), "compressor":
                                          "xz -T0 -6" if xz else "lzma preset 6",
                                          "compress_s": round(time.perf_counter() - t0, 1)}
        if len(data) > max_bytes:
            info["skipped"] = f"{len(data) / 2**20:.0f} MiB > {max_bytes / 2**20:.0f} MiB: too large to bring back"
            common.log(f"llama.cpp build not exported: {info['skipped']}")
            return []
        dest.mkdir(parents=True, exist_ok=True)
        parts = []
        for i in range(0, len(data), part_bytes):
            parts.append(dest / f"lcpp-bin.txz.{i // part_bytes:02d}")
            parts[-1].write_bytes(data[i:i + part_bytes])
        info["parts"] = [p.name for p in parts]
        common.log(f"llama.cpp build exported: {len(data) / 2**20:.1f} MiB in {len(parts)} parts in {dest}")
        return parts

    def import_build(self, src: Path) -> bool:
        """Joins src/lcpp-bin.txz.NN (export_build's parts; lcpp-bin.tgz.NN of older exports) into the
        gzipped tarball run.sh unpacks (`tar xzf`) instead of building; returns whether there were parts."""
        import gzip
        import lzma

        parts = sorted(src.glob("lcpp-bin.txz.[0-9][0-9]")) or sorted(src.glob("lcpp-bin.tgz.[0-9][0-9]"))
        if not parts:
            common.log(f"no lcpp-bin.txz.NN in {src}: llama.cpp is built")
            return False
        data = b"".join(p.read_bytes() for p in parts)
        if parts[0].name.startswith("lcpp-bin.txz"):
            data = gzip.compress(lzma.decompress(data), compresslevel=1)
        self.bin_tarball = self.out / "lcpp-bin.tgz"
        self.bin_tarball.parent.mkdir(parents=True, exist_ok=True)
        self.bin_tarball.write_bytes(data)
        self.lc["import_build"] = {"from": str(src), "parts": len(parts), "bytes": self.bin_tarball.stat().st_size}
        return True

    def quantize(self, qtype: str, threads: int) -> Path | None:
        """Returns the GGUF of `qtype` (Q4_K_M, Q2_K) made by llama-quantize from the bf16 one
        (beside it when memory allows, else in $LCPP_ROOT on disk), or None after a failure."""
        if self.lc.get("quantize_error"):
            return None
        src = self.ggufs["bf16"]
        need = src.stat().st_size * 0.4
        folder = self.gguf_dir if free_bytes(self.gguf_dir) > need + 8e9 else self.root
        dst = folder / f"{self.shape}-{qtype}.gguf"
        t0 = time.perf_counter()
        q = subprocess.run([str(self.bin / "llama-quantize"), str(src), str(dst), qtype, str(threads)],
                           capture_output=True, text=True, env=llama_env(self.bin / "llama-quantize"), check=False)
        info = self.lc.setdefault("quantize", {})[qtype] = {"seconds": time.perf_counter() - t0, "path": str(dst)}
        if q.returncode != 0:
            info["error"] = (q.stdout + q.stderr)[-1500:]
            common.log(f"llama-quantize {qtype} failed: {info['error'][-300:]}")
            self.save()
            return None
        info["bytes"] = dst.stat().st_size
        common.log(f"llama-quantize {qtype}: {info['bytes'] / 1e9:.2f} GB in {info['seconds']:.0f} s")
        self.ggufs[qtype] = dst
        self.save()
        return dst

    def drop(self, qtype: str) -> None:
        """Deletes a quantized GGUF once its rows are measured (memory for the next ones)."""
        path = self.ggufs.pop(qtype, None)
        if path is not None:
            path.unlink(missing_ok=True)

    # ---- llama-bench ------------------------------------------------------------------------------

    def bench(self, name: str, extra: list[str], gguf: str = "bf16", no_gpu: bool = False) -> dict:
        """Returns (and records as rows[name]) one llama-bench run (-r 2 -fa 1) of the `gguf` model:
        tok/s, and with a GPU the peak memory nvidia-smi saw beyond the idle figure. `no_gpu` hides
        the GPU from a CUDA build (-dev none -ngl 0: the issue's no-GPU row)."""
        binary = self.bin / "llama-bench"
        cmd = [str(binary), "-m", str(self.ggufs[gguf]), "-r", "2", "-o", "json", "-fa", "1", *extra]
        if no_gpu and self.cuda:
            cmd += ["-dev", "none", "-ngl", "0"]
        sample = self.cuda and not no_gpu
        t0 = time.perf_counter()
        with GpuMemorySampler() if sample else Nothing() as s:
            q = subprocess.run(cmd, capture_output=True, text=True, env=llama_env(binary), check=False)
        row = {"command": " ".join(["llama-bench", *cmd[1:]]), "gguf": gguf, "seconds": time.perf_counter() - t0}
        if q.returncode != 0:
            row["error"] = q.stderr[-1500:]
        else:
            r = json.loads(q.stdout)[0]
            row.update(tok_s=r["avg_ts"], stddev=r["stddev_ts"], n_threads=r["n_threads"], model_size=r.get("model_size"),
                       cpu_info=r.get("cpu_info"), gpu_info=r.get("gpu_info"), build_commit=r.get("build_commit"))
        if getattr(s, "peak_mib", None) is not None and self.idle_mib is not None:
            row["gpu_used_bytes"] = (s.peak_mib - self.idle_mib) * 2**20
        if not sample:
            row["loadavg_after"] = os.getloadavg()
        self.lc["rows"][name] = row
        common.log(f"llama.cpp {name}: {row.get('tok_s', 'error')} tok/s, GPU used "
                   f"{row.get('gpu_used_bytes', 0) / 1e9:.2f} GB")
        self.save()
        return row
