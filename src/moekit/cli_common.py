"""What every `moekit` command shares: the model folder flags and checks, --threads, the cheap
flag checks run before any loading, and the table and size formats. Imported by moekit.cli and
by each pillar's cli module (it imports neither, so they do not import each other)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .errors import MoekitError


# ---- formats -----------------------------------------------------------------------------------

def fmt_count(n: float) -> str:
    """Returns a count with a K/M/G/T suffix, e.g. 1.25M."""
    for unit, size in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


def fmt_bytes(n: float) -> str:
    """Returns a size in binary units, e.g. 1.50 GiB."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def table(rows: list[tuple[str, str]]) -> str:
    """Returns (name, value) rows as two aligned columns."""
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


# ---- flags -------------------------------------------------------------------------------------

def add_model_args(p: argparse.ArgumentParser) -> None:
    """Adds the model folder as an optional positional DIR and as --model DIR (the flag
    `moekit generate` takes, whose positional is the prompt); main() merges the two."""
    p.add_argument("model", nargs="?", help="HF model directory (default: the bundled tiny MoE)")
    p.add_argument("--model", dest="model_flag", metavar="DIR", default=None, help="the same as DIR")


def merge_model_args(args: argparse.Namespace) -> None:
    """Sets args.model from --model when DIR was not given; raises MoekitError when both differ."""
    flag = getattr(args, "model_flag", None)
    if flag is None:
        return
    if args.model is not None and Path(args.model) != Path(flag):
        raise MoekitError(f"the model is given twice ({args.model} and --model {flag}); give one")
    args.model = flag


def add_threads_arg(p: argparse.ArgumentParser) -> None:
    """Adds --threads N (PyTorch intra-op threads; default: moekit.threads.default_threads)."""
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads for PyTorch (default: the cores this process may use, less busy ones)")


def add_overwrite_arg(p: argparse.ArgumentParser) -> None:
    """Adds --overwrite (replace --out when moekit wrote it; see moekit.outputs)."""
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out if it exists and moekit wrote it (never an input or another folder)")


# ---- checks before any work ---------------------------------------------------------------------

def model_dir(path: str | Path | None, flag: str = "DIR") -> Path:
    """Returns the model folder (default: the bundled tiny MoE), checked to exist and hold a
    config.json; raises a one-line MoekitError otherwise."""
    from .load import default_model_path

    if path is None:
        return default_model_path()
    p = Path(path)
    if not p.exists():
        raise MoekitError(f"{flag} {p}: no such directory; give a Hugging Face model directory")
    if not p.is_dir():
        raise MoekitError(f"{flag} {p}: not a directory; give a Hugging Face model directory (config.json, "
                          "*.safetensors, tokenizer.json)")
    if not (p / "config.json").is_file():
        raise MoekitError(f"{p}: no config.json; give a Hugging Face model directory")
    return p


def refuse_compressed(path: Path, command: str) -> None:
    """Raises MoekitError when the checkpoint at `path` is moekit-compressed (config.json has a
    moekit quantization_config): `command` works on the original dense weights."""
    from .checkpoint import read_json
    from .quant.config import is_moekit_quantized

    config = read_json(path / "config.json")
    if is_moekit_quantized(config):
        q = config["quantization_config"]
        form = f"{q.get('method', '?')} {q.get('bits', '?')}{'' if q.get('bits') == 'ternary' else '-bit'}"
        raise MoekitError(f"{path} is a compressed checkpoint ({form} experts, see quantization_config in "
                          f"its config.json); `moekit {command}` needs dense weights: run it on the original "
                          "(bf16/fp32) checkpoint you compressed" + ("" if command == "compress" else ", then compress "
                                                                     "its output"))


def data_path(path: str | Path | None, flag: str) -> Path | None:
    """Returns a --data/--calib path checked to exist (None stays None)."""
    if path is None:
        return None
    p = Path(path)
    if not p.exists():
        raise MoekitError(f"{flag} {p}: not found; give a text file, a .jsonl file or a folder of them")
    return p


def check_min(flag: str, value: float | None, minimum: float) -> None:
    """Raises MoekitError when a flag's value is below `minimum` (None is not checked)."""
    if value is not None and value < minimum:
        raise MoekitError(f"{flag} must be >= {minimum}, got {value}")


def model_context(path: Path) -> int:
    """Returns the model's max_position_embeddings, reading config.json only."""
    from .load import read_config

    return read_config(path)[2].max_position_embeddings


def check_quantize_dense(args: argparse.Namespace, device: str, cpu_step: bool = False) -> None:
    """Raises MoekitError where --quantize-dense int8 cannot run: --parallel (ranks split bf16 weights),
    --compile, and the CPU unless `cpu_step` (generate): there the CPU decode step's own int8 kernels
    take it (as --cpu-quantize-dense int8; args are set so), under check_cpu_quantize_dense's rules,
    which a CPU run gets here with either flag."""
    if getattr(args, "quantize_dense", None) != "int8":
        if not device.startswith("cuda"):
            check_cpu_quantize_dense(args, device)
        return
    if getattr(args, "parallel", None):
        raise MoekitError("--quantize-dense int8 is not available with --parallel yet (the ranks split bf16 "
                          "projections); drop one of them")
    if device.startswith("cuda"):
        if getattr(args, "compile", False):  # a compiled step would dequantize every weight each step
            raise MoekitError("--quantize-dense int8 and --compile do not go together yet (the compiled step would "
                              "rebuild each projection's weights every step); drop one of them")
        return
    if not cpu_step:
        raise MoekitError(f"--quantize-dense int8 is for a GPU here; on {device} drop it")
    if getattr(args, "cpu_quantize_dense", None) in ("bf16", "int4"):
        raise MoekitError(f"--quantize-dense int8 and --cpu-quantize-dense {args.cpu_quantize_dense} disagree; give "
                          "one of them")
    args.cpu_quantize_dense, args.quantize_dense = "int8", None  # the CPU step's dense_q8 kernels
    check_cpu_quantize_dense(args, device)


def check_cpu_quantize_dense(args: argparse.Namespace, device: str) -> None:
    """--cpu-quantize-dense int8 / int4 (or --quantize-dense int8 on the CPU) runs in the native CPU decode
    step, which takes a bf16 model and no offloaded experts: gives a CPU run bfloat16 where --dtype is not
    given, and raises MoekitError where the step would not run (the flag would do nothing)."""
    form = getattr(args, "cpu_quantize_dense", None)
    if form not in ("int8", "int4"):
        return
    if getattr(args, "offload", False):
        raise MoekitError(f"{form} projections on {device} are the CPU decode step's, which an offloaded model does "
                          f"not run; drop --offload or the {form} flag")
    if args.dtype not in (None, "bfloat16", "bf16"):
        raise MoekitError(f"{form} projections on {device} run in the CPU decode step, which takes a bfloat16 model; "
                          f"drop --dtype {args.dtype} (or give --dtype bfloat16)")
    args.dtype = "bfloat16"


def add_quantize_dense_arg(parser: argparse.ArgumentParser) -> None:
    """Adds --quantize-dense to a command that loads a model on a GPU (generate, serve)."""
    parser.add_argument("--quantize-dense", choices=("bf16", "int8"), default=None,
                        help="GPU: hold the attention projections, dense / shared MLPs and an untied LM head as "
                             "int8 rows with a scale each (half their bytes; quantized while loading, routers "
                             "kept as loaded) so a small --device-memory holds more experts; generate on the CPU: "
                             "the same as --cpu-quantize-dense int8 (default: bf16)")
