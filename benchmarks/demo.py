"""`naturelm-edge demo`: the main job end to end, from a synthetic chorus to a field bundle.

Stages, in order, each calling the project's own typed functions in this process (the
Lightning stages through their LightningCLI with an argument list; a Lightning stage in
several processes, as the student on two or more CPU cores, runs as its own
``naturelm-edge`` command, since DDP re-launches the command line in each process):

1. corpus: the synthetic chorus (`corpus synth`), clips in splits and a long soundscape with
   its Raven ground truth, and two more choruses of the next seeds that only the encoder
   pretraining uses (or ``--corpus``, a real manifest);
2. teacher: the ``tiny`` teacher trained by its shipped LightningCLI config (`teacher fit`;
   or ``--teacher``, an existing checkpoint, or ``--teacher-config``, another YAML);
3. teacher-eval: the teacher scored BEANS-Zero style on the test split (`teacher eval`);
4. targets: the teacher's targets for every clip and task (`distill label`);
5. student-SIZE: each student distilled by its shipped config (`distill fit`; on the CPU in
   two processes of half the batch where there are two or more cores) and reported;
6. export-SIZE: ONNX FP32 (front end inside), FP16 and INT8 (`export onnx`, `export quantize`);
   a variant below its top-1 agreement bar with FP32 is left out (``--on-fail drop``) and
   listed, with its agreement per task, at the end of the report;
7. bundle-SIZE: the bundle with its measured agreement with the teacher (`export bundle`);
8. analysis-SIZE: the runtime on the long soundscape (`analyze`, one thread), its detections
   scored against the soundscape's Raven table: a detection (one window) is right when a
   call of its label overlaps its window, a call is found when a detection of its label
   overlaps it (precision / recall within one window);
9. table: accuracy against the ground truth, agreement with the teacher, calibration and
   latency (ms per window and times real time, one thread, batch 1, measured in this run)
   for the teacher and every student model (FP32 / FP16 / INT8); printed as markdown, saved
   as OUT/report.md and OUT/report.json, with a Pareto plot OUT/accuracy.png, and ended by
   one JSON line.

Every stage writes a marker ``OUT/stages/NN-<stage>.json`` with its outputs, its time and the
machine load. A rerun skips every finished stage whose inputs did not change (a stage's key
covers its options and the runs of the stages it depends on), so an interrupted demo resumes
after the last finished stage; the targets and the analysis also resume inside the stage.
``--no-resume`` starts over. Sizes are the shipped configs; nothing is copied here, so tuning
`teacher/configs/tiny.yaml` or `distill/configs/student-*.yaml` changes the demo.

    $ naturelm-edge demo                                  # runs/default, 2 CPU cores
    $ naturelm-edge demo --out runs/quick --quick         # a much smaller run (tests)
    $ naturelm-edge demo --corpus data/manifest.jsonl --teacher naturelm.ckpt \\
          --accelerator gpu --student-sizes s m
    >>> sorted(PLANS)
    ['default', 'quick']
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from runtime.errors import InputError, ManifestError

STAGES_DIR = "stages"
LATENCY_THREADS = 1


@dataclass(frozen=True)
class DemoPlan:
    """How large a demo run is; the model hyper-parameters come from the shipped configs.

    Args:
        clips: synthetic clips (None: `corpus synth`'s default).
        clips_per_recording: clips per synthetic recording session.
        soundscape_min: minutes of the long soundscape.
        pretrain_epochs: epochs of supervised encoder pretraining on the clip labels before a
            from-scratch teacher (the `tiny` config) is trained on top of it, frozen; 0 skips.
        pretrain_clips: clips of each further synthetic chorus (the next seeds: other
            recordings, animals and sites) that the encoder pretraining also trains on
            (synthetic corpus only; 0: none).
        pretrain_choruses: how many such choruses (seeds ``seed + 1`` to ``seed + n``).
        teacher_args: extra LightningCLI arguments for `teacher fit`.
        student_args: extra LightningCLI arguments for `distill fit`.
        max_new_tokens: longest generated teacher answer (eval and targets).
        calibration_clips: clips calibrating INT8.
        heldout_clips: clips checking FP16 / INT8 against FP32.
        latency_repeats: timed calls per model in the final table.
    """

    clips: int | None = None
    clips_per_recording: int = 10
    soundscape_min: float = 10.0
    pretrain_epochs: int = 8
    pretrain_clips: int = 4800
    pretrain_choruses: int = 2
    teacher_args: tuple[str, ...] = ()
    student_args: tuple[str, ...] = ()
    max_new_tokens: int = 24
    calibration_clips: int = 128
    heldout_clips: int = 512
    latency_repeats: int = 20


PLANS: dict[str, DemoPlan] = {
    "default": DemoPlan(),
    "quick": DemoPlan(
        clips=40, clips_per_recording=4, soundscape_min=0.5, pretrain_epochs=1, pretrain_clips=8,
        teacher_args=("--trainer.max_epochs=1", "--trainer.limit_train_batches=3",
                      "--data.batch_size=4"),
        student_args=("--trainer.max_epochs=3", "--data.num_workers=0", "--data.batch_size=8"),
        max_new_tokens=6, calibration_clips=8, heldout_clips=16, latency_repeats=5),
}


# -- stage bookkeeping --------------------------------------------------------------------------
@dataclass(frozen=True)
class Stage:
    """One step of the demo: ``run(outputs)`` gets every earlier stage's outputs by name and
    returns its own (JSON-able). ``folder`` (relative to OUT) is cleared before a fresh run;
    a ``resumable`` stage keeps it when resuming its own interrupted run."""

    number: int
    name: str
    title: str
    run: Callable[[Mapping[str, Mapping[str, Any]]], dict[str, Any]]
    deps: tuple[str, ...] = ()
    options: Mapping[str, Any] = field(default_factory=dict)
    folder: str | None = None
    resumable: bool = False


def stage_key(stage: Stage, markers: Mapping[str, Mapping[str, Any]]) -> str:
    """A hash of the stage's options and the runs (ids) of the stages it depends on."""
    payload = {"name": stage.name, "options": stage.options,
               "deps": {d: markers[d]["run_id"] for d in stage.deps}}
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _marker_path(out: Path, stage: Stage, suffix: str = ".json") -> Path:
    return out / STAGES_DIR / f"{stage.number:02d}-{stage.name}{suffix}"


def read_marker(path: Path) -> dict[str, Any] | None:
    """A stage marker, or None when absent; a damaged marker raises `InputError`."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(path, f"damaged stage marker ({exc.msg}); delete it to rerun the "
                               "stage") from exc
    if not isinstance(data, dict) or "key" not in data or "outputs" not in data:
        raise InputError(path, "not a demo stage marker; delete it to rerun the stage")
    return data


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    from runtime.files import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(data, indent=1, default=str) + "\n")


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else []


def _say(text: str) -> None:
    print(text, flush=True)


def run_stages(out: Path, stages: Sequence[Stage], resume: bool = True,
               ) -> dict[str, dict[str, Any]]:
    """Run ``stages`` in order into ``out``, skipping those whose marker holds the current
    key; returns every stage's marker by name. One progress line per stage."""
    markers: dict[str, dict[str, Any]] = {}
    begin = time.perf_counter()
    if not resume:
        shutil.rmtree(out / STAGES_DIR, ignore_errors=True)
    for i, stage in enumerate(stages, start=1):
        head = f"[{i}/{len(stages)}] {stage.number}. {stage.title}"
        key = stage_key(stage, markers)
        marker = read_marker(_marker_path(out, stage))
        if marker is not None and marker["key"] == key:
            markers[stage.name] = marker
            _say(f"{head}: done earlier ({marker['seconds']:.1f} s), skipped")
            continue
        started_path = _marker_path(out, stage, ".started.json")
        started = read_marker(started_path) if started_path.is_file() else None
        again = started is not None and started["key"] == key and stage.resumable
        if stage.folder and not again:
            shutil.rmtree(out / stage.folder, ignore_errors=True)
        _say(f"{head} ..." + (" (resuming)" if again else ""))
        _write_json(started_path, {"key": key, "outputs": {}, "started": time.time()})
        load_before, t0 = _load(), time.perf_counter()
        outputs = stage.run({name: m["outputs"] for name, m in markers.items()})
        seconds = time.perf_counter() - t0
        marker = {"stage": stage.name, "number": stage.number, "title": stage.title,
                  "key": key, "run_id": uuid.uuid4().hex, "seconds": round(seconds, 2),
                  "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                  "load_before": load_before, "load_after": _load(), "outputs": outputs}
        _write_json(_marker_path(out, stage), marker)
        started_path.unlink(missing_ok=True)
        markers[stage.name] = marker
        _say(f"{head}: done in {seconds:.1f} s (demo {time.perf_counter() - begin:.0f} s, "
             f"load {' '.join(map(str, _load()))})")
    return markers


# -- soundscape scoring -------------------------------------------------------------------------
@dataclass(frozen=True)
class Event:
    """A labelled time span: a detection window or a ground-truth call."""

    begin_s: float
    end_s: float
    label: str


def _overlaps(a: Event, b: Event, tolerance_s: float) -> bool:
    return a.label == b.label and a.begin_s - tolerance_s < b.end_s \
        and b.begin_s < a.end_s + tolerance_s


def score_events(detections: Sequence[Event], calls: Sequence[Event],
                 tolerance_s: float = 0.0) -> dict[str, float | int]:
    """Precision (detections overlapping a call of their label) and recall (calls overlapped
    by a detection of their label), spans widened by ``tolerance_s`` on each side.

    >>> calls = [Event(1.0, 2.0, "Kea"), Event(25.0, 26.0, "Tui")]
    >>> score_events([Event(0.0, 10.0, "Kea"), Event(10.0, 20.0, "Kea")], calls)
    {'precision': 0.5, 'recall': 0.5, 'detections': 2, 'calls': 2}
    """
    right = sum(any(_overlaps(d, c, tolerance_s) for c in calls) for d in detections)
    found = sum(any(_overlaps(c, d, tolerance_s) for d in detections) for c in calls)
    return {"precision": right / len(detections) if detections else 0.0,
            "recall": found / len(calls) if calls else 0.0,
            "detections": len(detections), "calls": len(calls)}


def read_detections(path: Path, task: str) -> list[Event]:
    """The detections of ``task`` in an `analyze` ``detections.csv``."""
    if not path.is_file():
        raise InputError(path, "no detections.csv (did the analysis run?)")
    with path.open(newline="", encoding="utf-8") as handle:
        return [Event(float(r["start_s"]), float(r["end_s"]), r["label"])
                for r in csv.DictReader(handle) if r["task"] == task]


def read_calls(table: Path, column: str = "Species") -> list[Event]:
    """Ground-truth calls from a Raven selection table (label from ``column``)."""
    from runtime.raven import read_raven_table

    selections = read_raven_table(table)
    if selections and column not in selections[0].annotations:
        raise ManifestError(table, f"no column {column!r} in the selection table")
    return [Event(s.begin_s, s.end_s, s.annotations[column]) for s in selections]


def truth_table(recording: Path) -> Path | None:
    """The Raven table beside a recording: ``<stem>.selections.txt`` or Raven's
    ``<stem>.Table.1.selections.txt``; None when there is none."""
    for name in (f"{recording.stem}.selections.txt", f"{recording.stem}.Table.1.selections.txt"):
        if (recording.parent / name).is_file():
            return recording.parent / name
    return None


# -- the stages ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Options:
    """Everything the stages read; see `demo` for each field."""

    out: Path
    seed: int
    plan: DemoPlan
    corpus: Path | None
    soundscape: Path | None
    teacher: Path | None
    teacher_config: str
    student_sizes: tuple[str, ...]
    accelerator: str
    devices: int
    threads: int | None

    @property
    def torch_device(self) -> str:
        """cuda when the accelerator asks for a GPU (or auto finds one), else cpu."""
        if self.accelerator in ("gpu", "cuda"):
            return "cuda"
        if self.accelerator == "auto":
            import torch

            return "cuda" if torch.cuda.is_available() else "cpu"
        return "cpu"

    @property
    def torch_threads(self) -> int:
        """Threads of the training and labelling: ``--threads``, else every core this
        process may use (the demo runs alone; on a quiet 2-core machine two threads make a
        pretraining step 1.6x and a student step 1.7x faster than one)."""
        from benchmarks.harness import usable_cores

        return self.threads or usable_cores()

    @property
    def processes(self) -> int:
        """Processes of the student's training (`distill fit`): ``--devices``; on the CPU by
        default two where there are two or more cores, each with half the threads and half
        the batch (the same recipe: 32 clips a step). On the idle 2-core machine a step of
        `s` (batch and data loading) took 0.384 s on two threads in one process and 0.294 s
        in two one-thread processes under DDP, gradient exchange included (Lightning's
        simple profiler, 100 steps). The labelling gains nothing so (the valid split, 2,286
        clip-tasks: 32.4 s on two threads, 33.4 s in two processes) and stays in one."""
        if self.devices != 1 or self.torch_device != "cpu" or self.threads is not None:
            return self.devices
        return 2 if self.torch_threads >= 2 else 1

    @property
    def process_threads(self) -> int:
        """Torch threads of each of those processes."""
        return max(1, self.torch_threads // self.processes) if self.torch_device == "cpu" \
            else self.torch_threads

    def trainer_args(self, processes: int = 1) -> list[str]:
        """The arguments both LightningCLI stages (`teacher fit`, `distill fit`) share, for a
        run in ``processes`` processes (DDP when more than one)."""
        progress = "true" if sys.stderr.isatty() else "false"
        if processes == 1:
            devices, threads = self.devices, self.torch_threads
        else:
            devices, threads = processes, self.process_threads
        args = [f"--seed_everything={self.seed}", f"--num_threads={threads}",
                f"--trainer.accelerator={self.accelerator}", f"--trainer.devices={devices}",
                f"--trainer.enable_progress_bar={progress}"]
        return args + (["--trainer.strategy=ddp"] if processes > 1 else [])


def run_command(args: Sequence[str], what: str) -> None:
    """Run ``naturelm-edge ARGS`` in its own process and wait for it. A Lightning stage in
    several processes runs so: DDP starts each further process by re-running the command
    line of the first, which must be that stage's command, not the demo."""
    import shlex
    import subprocess

    command = [sys.executable, "-m", "naturelm_edge", *args]
    _say(f"{what}: naturelm-edge {shlex.join(args)}")
    code = subprocess.run(command, check=False).returncode
    if code != 0:
        raise RuntimeError(f"{what} failed (exit code {code}; its error is printed above): "
                           f"{shlex.join(command)}")


def _count_splits(manifest: Path) -> dict[str, int]:
    from corpus.manifest import read_manifest

    counts: dict[str, int] = {}
    for record in read_manifest(manifest):
        counts[record.split] = counts.get(record.split, 0) + 1
    return counts


def stage_corpus(o: Options) -> dict[str, Any]:
    """The synthetic chorus (or the given manifest) and the long recording with its truth."""
    extra: list[str] = []
    if o.corpus is not None:
        if not o.corpus.is_file():
            raise ManifestError(o.corpus, "manifest not found")
        manifest, recording = o.corpus.resolve(), o.soundscape
    else:
        from corpus.cli import synth

        folder = o.out / "corpus"
        plan = o.plan
        synth(out=folder, seed=o.seed, soundscape_min=plan.soundscape_min, quiet=True,
              clips_per_recording=plan.clips_per_recording,
              **({"clips": plan.clips} if plan.clips else {}))
        manifest, recording = folder / "manifest.jsonl", folder / "soundscape.flac"
        choruses = plan.pretrain_choruses if plan.pretrain_clips else 0
        for k in range(1, choruses + 1):
            chorus = o.out / f"corpus-pretrain-{k}"
            synth(out=chorus, seed=o.seed + k, clips=plan.pretrain_clips, soundscape_min=0.0,
                  clips_per_recording=plan.clips_per_recording, quiet=True)
            extra.append(str(chorus / "manifest.jsonl"))
    if recording is not None and not recording.is_file():
        raise InputError(recording, "long recording not found")
    table = truth_table(recording) if recording is not None else None
    return {"manifest": str(manifest), "records": _count_splits(manifest),
            "pretrain_manifests": extra,
            "soundscape": str(recording) if recording else None,
            "truth": str(table) if table else None}


def stage_teacher(o: Options, corpus: Mapping[str, Any]) -> dict[str, Any]:
    """Train the teacher with its LightningCLI config, or take the given checkpoint."""
    if o.teacher is not None:
        if not o.teacher.is_file():
            raise InputError(o.teacher, "teacher checkpoint not found")
        return {"checkpoint": str(o.teacher.resolve()), "trained": False}
    from teacher.cli import fit

    folder = o.out / "teacher"
    argv = ["--config", o.teacher_config, f"--data.manifest={corpus['manifest']}",
            f"--trainer.default_root_dir={folder}", *o.trainer_args(o.devices),
            "--trainer.enable_model_summary=false"]
    if o.teacher_config == "tiny" and o.plan.pretrain_epochs > 0:
        argv.append("--model.config=" + json.dumps(pretrain_tiny_encoder(o, corpus, folder)))
    if o.devices > 1:
        run_command(["teacher", "fit", *argv, *o.plan.teacher_args], "teacher fit")
    else:
        fit([*argv, *o.plan.teacher_args])
    checkpoint = folder / "teacher.ckpt"
    if not checkpoint.is_file():
        raise InputError(checkpoint, "teacher fit wrote no checkpoint")
    return {"checkpoint": str(checkpoint), "trained": True, "config": o.teacher_config}


def pretrain_tiny_encoder(o: Options, corpus: Mapping[str, Any], folder: Path) -> dict[str, Any]:
    """Pretrain the tiny teacher's BEATs on the clip labels (nothing pretrained exists offline,
    while NatureLM-audio starts from a pretrained BEATs) and return the teacher-config overrides
    that load it, frozen; the further synthetic choruses the corpus stage made are trained on
    too. Measured figures: `teacher/configs/tiny.yaml`."""
    from teacher.pretrain import pretrain_encoder

    path = folder / "encoder.pt"
    extra = [Path(m) for m in corpus["pretrain_manifests"]]
    code = pretrain_encoder(Path(corpus["manifest"]), path, preset="tiny",
                            epochs=o.plan.pretrain_epochs, num_threads=o.torch_threads,
                            extra_manifests=extra, device=o.torch_device)
    if code != 0 or not path.is_file():
        raise InputError(path, f"encoder pretraining failed (exit code {code})")
    return {"encoder_checkpoint": str(path), "train_encoder": False}


def stage_teacher_eval(o: Options, corpus: Mapping[str, Any],
                       teacher: Mapping[str, Any]) -> dict[str, Any]:
    """The teacher's BEANS-Zero-style table on the test split."""
    from teacher.cli import eval as teacher_eval

    path = o.out / "teacher-eval" / "eval.json"
    teacher_eval(Path(teacher["checkpoint"]), Path(corpus["manifest"]), split="test", out=path,
                 max_new_tokens=o.plan.max_new_tokens, device=o.torch_device)
    return {"eval": str(path), "results": json.loads(path.read_text())["results"]}


def stage_targets(o: Options, corpus: Mapping[str, Any],
                  teacher: Mapping[str, Any]) -> dict[str, Any]:
    """The teacher's targets for every clip and task (resumable inside the stage)."""
    from distill.label import label
    from distill.targets import TargetStore

    folder = o.out / "targets"
    if o.devices > 1:
        run_command(["distill", "label", teacher["checkpoint"], corpus["manifest"], str(folder),
                     f"--accelerator={o.accelerator}", f"--devices={o.devices}",
                     "--strategy=ddp", f"--max-new-tokens={o.plan.max_new_tokens}",
                     f"--num-threads={o.process_threads}"], "distill label")
    else:
        label(Path(teacher["checkpoint"]), Path(corpus["manifest"]), folder,
              accelerator=o.accelerator, devices=str(o.devices),
              max_new_tokens=o.plan.max_new_tokens, resume=True,
              num_threads=o.torch_threads)
    store = TargetStore(folder)
    return {"targets": str(folder), "rows": len(store), "teacher_hash": store.teacher_hash}


def stage_student(o: Options, size: str, corpus: Mapping[str, Any],
                  targets: Mapping[str, Any]) -> dict[str, Any]:
    """Distill one student with its shipped config and report it on the test split."""
    from distill.cli import fit, format_report, report_rows

    folder = o.out / "students" / size
    argv = ["--config", f"student-{size}", f"--data.manifest={corpus['manifest']}",
            f"--data.targets={targets['targets']}", f"--trainer.default_root_dir={folder}",
            "--trainer.enable_model_summary=false", *o.plan.student_args]
    processes = o.processes
    if processes > 1 and o.devices == 1:  # the CPU's processes share the recipe's batch
        batch = student_batch_size(argv)
        processes = processes if batch % processes == 0 else 1
        argv.append(f"--data.batch_size={batch // processes}")
    if processes > 1:
        run_command(["distill", "fit", *argv, *o.trainer_args(processes)], "distill fit")
    else:
        fit([*argv, *o.trainer_args()])
    checkpoint = folder / "student.ckpt"
    if not checkpoint.is_file():
        raise InputError(checkpoint, "distill fit wrote no checkpoint")
    rows = report_rows(checkpoint, Path(targets["targets"]), Path(corpus["manifest"]),
                       device=o.torch_device)
    _say(format_report(rows))
    return {"checkpoint": str(checkpoint), "report": rows}


def student_batch_size(argv: Sequence[str]) -> int:
    """The batch size a `distill fit` command line trains with: its last
    ``--data.batch_size=N``, else its ``--config``'s (a shipped name or a YAML path)."""
    import yaml

    from distill.cli import resolve_config_args

    given = [a.split("=", 1)[1] for a in argv if a.startswith("--data.batch_size=")]
    if given:
        return int(given[-1])
    resolved = resolve_config_args(list(argv))
    config = Path(resolved[resolved.index("--config") + 1])
    return int(yaml.safe_load(config.read_text())["data"]["batch_size"])


def stage_export(o: Options, size: str, corpus: Mapping[str, Any],
                 student: Mapping[str, Any]) -> dict[str, Any]:
    """ONNX FP32 with the front end inside, then FP16 and INT8 checked against it; a variant
    below its agreement bar is dropped (recorded, and shown in the final report) so the run
    goes on with the variants that passed."""
    from export.bundle import read_report
    from export.cli import onnx, quantize

    folder = o.out / "export" / size
    onnx(Path(student["checkpoint"]), folder, threads=LATENCY_THREADS)
    quantize(folder, Path(corpus["manifest"]), calibration_clips=o.plan.calibration_clips,
             heldout_clips=o.plan.heldout_clips, on_fail="drop")
    report = read_report(folder)
    return {"export": str(folder), "models": report["models"],
            "agreement_fp32": report.get("agreement_fp32", {}),
            "rejected": report.get("rejected", {})}


def stage_bundle(o: Options, size: str, corpus: Mapping[str, Any], targets: Mapping[str, Any],
                 export: Mapping[str, Any]) -> dict[str, Any]:
    """The bundle folder and archive, with the agreement with the teacher measured."""
    from export.cli import bundle
    from runtime.bundle import load_bundle

    folder = o.out / "bundles" / size
    bundle(Path(export["export"]), folder, name=f"demo-{size}", targets=Path(targets["targets"]),
           manifest=Path(corpus["manifest"]))
    manifest = load_bundle(folder).manifest
    return {"bundle": str(folder), "archive": str(folder.parent / f"{size}.tar.gz"),
            "agreement": dict(manifest.agreement), "latency_ms": dict(manifest.latency_ms)}


def stage_analysis(o: Options, size: str, corpus: Mapping[str, Any],
                   bundle: Mapping[str, Any]) -> dict[str, Any]:
    """The runtime on the long recording, scored against its Raven table when it has one."""
    from runtime.analyze import analyze
    from runtime.bundle import load_bundle

    if not corpus.get("soundscape"):
        return {"skipped": "no long recording (give --soundscape with --corpus)"}
    folder = o.out / "analysis" / size
    recording = Path(corpus["soundscape"])
    t0 = time.perf_counter()
    code = analyze(Path(bundle["bundle"]), [str(recording)], out=folder,
                   threads=o.threads or LATENCY_THREADS, merge=False, progress=False)
    seconds = time.perf_counter() - t0
    if code != 0:
        raise InputError(folder / "errors.csv", "the analysis of the long recording failed")
    import soundfile

    duration = soundfile.info(str(recording)).duration
    names = [t.name for t in load_bundle(Path(bundle["bundle"])).manifest.tasks]
    task = "detection" if "detection" in names else names[0]
    outputs: dict[str, Any] = {"detections": str(folder / "detections.csv"), "task": task,
                               "seconds": round(seconds, 2), "audio_s": duration,
                               "x_real_time": duration / seconds}
    if corpus.get("truth"):
        outputs.update(score_events(read_detections(folder / "detections.csv", task),
                                    read_calls(Path(corpus["truth"]))))
    return outputs


def stage_table(o: Options, corpus: Mapping[str, Any], teacher: Mapping[str, Any],
                targets: Mapping[str, Any], bundles: Mapping[str, Mapping[str, Any]],
                analyses: Mapping[str, Mapping[str, Any]],
                exports: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Accuracy, agreement, calibration and latency for the teacher and every model."""
    from benchmarks.accuracy import LatencyOptions, run_accuracy

    result = run_accuracy([Path(b["bundle"]) for b in bundles.values()],
                          Path(corpus["manifest"]), Path(targets["targets"]),
                          teacher=Path(teacher["checkpoint"]), split="test",
                          latency=LatencyOptions(measure=True, threads=LATENCY_THREADS,
                                                 repeats=o.plan.latency_repeats),
                          plot_path=o.out / "accuracy.png", quiet=True)
    table = final_table(result["models"], result["rows"])
    sound = [{"bundle": f"demo-{size}", **{k: a.get(k) for k in
                                           ("task", "precision", "recall", "detections",
                                            "calls", "x_real_time", "skipped")}}
             for size, a in analyses.items()]
    fp32 = {(r["model"], r["task"]): r["score"] for r in result["rows"]}
    rejected = []
    for size, e in exports.items():
        records = e.get("rejected", {})
        kept = {f: Path(e["export"]) / r["file"] for f, r in records.items() if r.get("file")}
        scored = score_model_files({f: p for f, p in kept.items() if p.is_file()},
                                   Path(bundles[size]["bundle"]), Path(corpus["manifest"]))
        for file, r in records.items():
            scores = scored.get(file, {})
            rejected.append({"bundle": f"demo-{size}", **r, "file": file, "accuracy": scores,
                             "fp32_accuracy": {t: fp32.get((f"demo-{size} fp32", t))
                                               for t in scores}})
    markdown = render_report(table, sound, result["context"], rejected)
    from runtime.files import atomic_write_text

    atomic_write_text(o.out / "report.md", markdown + "\n")
    payload = {"demo": str(o.out), "models": table, "soundscape": sound,
               "rejected": rejected, "context": result["context"], "plot": result.get("plot")}
    _write_json(o.out / "report.json", payload)
    return {"report": str(o.out / "report.md"), "json": str(o.out / "report.json"),
            **payload}


def score_model_files(models: Mapping[str, Path], bundle: Path, manifest: Path,
                      split: str = "test") -> dict[str, dict[str, float]]:
    """The headline score per task (accuracy, or macro-F1 for detection) of ONNX models that
    are not in ``bundle`` but have its inputs and outputs (variants refused by their
    agreement gate), by name, on the manifest's ``split`` clips (read once for all)."""
    from benchmarks.accuracy import load_heldout, model_rows, run_model
    from runtime.bundle import load_bundle

    if not models:
        return {}
    manifest_of = load_bundle(bundle).manifest
    tasks = manifest_of.tasks
    held = load_heldout(manifest, split, manifest_of.sample_rate, manifest_of.window_s,
                        {t.name: t.labels for t in tasks})
    return {name: {r["task"]: r["score"]
                   for r in model_rows(name, run_model(path, held.audio), held, tasks, None)}
            for name, path in models.items()}


def final_table(models: Sequence[Mapping[str, Any]], rows: Sequence[Mapping[str, Any]],
                ) -> list[dict[str, Any]]:
    """One row per model: its headline score per task and their mean, agreement, ECE,
    ms per window and times real time (1 thread, batch 1)."""
    out = []
    for m in models:
        row: dict[str, Any] = {"model": m["model"]}
        for r in rows:
            if r["model"] == m["model"]:
                row[f"{r['task']} ({'acc' if r['metric'] == 'accuracy' else 'F1'})"] = r["score"]
        row.update({"mean": m.get("score"), "agreement": m.get("agreement"),
                    "ece": m.get("ece"), "ms_per_window": m.get("latency_ms"),
                    "x_real_time": m.get("x_real_time")})
        out.append(row)
    return out


def render_report(table: Sequence[Mapping[str, Any]], soundscape: Sequence[Mapping[str, Any]],
                  context: Mapping[str, Any], rejected: Sequence[Mapping[str, Any]] = ()) -> str:
    """The markdown report: the model table (percentages), the soundscape scores and the
    variants left out at their agreement gate (each with its reason)."""
    from benchmarks.harness import markdown_table

    shown = [{k: (100 * v if isinstance(v, float) and k not in ("ms_per_window", "x_real_time")
                  else v) for k, v in row.items()} for row in table]
    lines = [
        "## Accuracy against ground truth and the teacher, latency (test split)", "",
        "Scores, agreement and ECE in %; latency: mean ms per window, 1 thread, batch 1, "
        f"on {context.get('cpu')} ({context.get('cores')} cores).", "",
        markdown_table(shown, floatfmt=".1f"), "",
        "## Long soundscape: detections against the Raven ground truth (within one window)", "",
        markdown_table(soundscape, floatfmt=".3f")]
    if rejected:
        lines += ["", "## Variants left out: below their top-1 agreement bar with FP32", "",
                  "Agreement with FP32 on held-out clips; where measured, the refused model's "
                  "score against the labels (test split, %) with FP32's in brackets.", ""]
        lines += [f"- {r['bundle']}: {r['file']} ({r['precision']}, bar {r['bar']:.1%}): "
                  + ", ".join(f"{task.removesuffix('_logits')} {value:.2%}"
                              for task, value in r["agreement"].items())
                  + ("; against the labels: " + ", ".join(
                      f"{task} {100 * v:.1f}"
                      + ("" if r["fp32_accuracy"].get(task) is None
                         else f" ({100 * r['fp32_accuracy'][task]:.1f})")
                      for task, v in r["accuracy"].items()) if r.get("accuracy") else "")
                  for r in rejected]
    return "\n".join(lines)


def build_stages(o: Options) -> list[Stage]:
    """The demo's stages for these options (one student, export, bundle and analysis stage
    per size)."""
    plan = asdict(o.plan)
    stages = [
        Stage(1, "corpus", "synthetic corpus" if o.corpus is None else "corpus (given)",
              lambda out: stage_corpus(o), (),
              {"seed": o.seed, "corpus": o.corpus, "soundscape": o.soundscape,
               "clips": plan["clips"], "soundscape_min": plan["soundscape_min"],
               "per_recording": plan["clips_per_recording"],
               "pretrain_clips": plan["pretrain_clips"],
               "pretrain_choruses": plan["pretrain_choruses"]}),
        Stage(2, "teacher", "teacher (Lightning)" if o.teacher is None else "teacher (given)",
              lambda out: stage_teacher(o, out["corpus"]), ("corpus",),
              {"teacher": o.teacher, "config": o.teacher_config, "args": plan["teacher_args"],
               "pretrain_epochs": plan["pretrain_epochs"]},
              folder="teacher"),
        Stage(3, "teacher-eval", "teacher eval (test split)",
              lambda out: stage_teacher_eval(o, out["corpus"], out["teacher"]),
              ("corpus", "teacher"), {"tokens": plan["max_new_tokens"]}, folder="teacher-eval"),
        Stage(4, "targets", "teacher targets (distill label)",
              lambda out: stage_targets(o, out["corpus"], out["teacher"]), ("corpus", "teacher"),
              {"tokens": plan["max_new_tokens"]}, folder="targets", resumable=True),
    ]
    for size in o.student_sizes:
        stages.append(Stage(5, f"student-{size}", f"student {size} (distill fit)",
                            lambda out, s=size: stage_student(o, s, out["corpus"],
                                                              out["targets"]),
                            ("corpus", "targets"),
                            {"args": plan["student_args"], "processes": o.processes},
                            folder=f"students/{size}"))
    for size in o.student_sizes:
        stages.append(Stage(6, f"export-{size}", f"ONNX FP32 / FP16 / INT8 ({size})",
                            lambda out, s=size: stage_export(o, s, out["corpus"],
                                                             out[f"student-{s}"]),
                            ("corpus", f"student-{size}"),
                            {"calib": plan["calibration_clips"], "held": plan["heldout_clips"]},
                            folder=f"export/{size}"))
    for size in o.student_sizes:
        stages.append(Stage(7, f"bundle-{size}", f"bundle ({size})",
                            lambda out, s=size: stage_bundle(o, s, out["corpus"], out["targets"],
                                                             out[f"export-{s}"]),
                            ("corpus", "targets", f"export-{size}"), {},
                            folder=f"bundles/{size}"))
    for size in o.student_sizes:
        stages.append(Stage(8, f"analysis-{size}", f"analysis of the long soundscape ({size})",
                            lambda out, s=size: stage_analysis(o, s, out["corpus"],
                                                               out[f"bundle-{s}"]),
                            ("corpus", f"bundle-{size}"), {"threads": o.threads},
                            folder=f"analysis/{size}", resumable=True))
    sizes = o.student_sizes
    stages.append(Stage(
        9, "table", "final table",
        lambda out: stage_table(o, out["corpus"], out["teacher"], out["targets"],
                                {s: out[f"bundle-{s}"] for s in sizes},
                                {s: out[f"analysis-{s}"] for s in sizes},
                                {s: out[f"export-{s}"] for s in sizes}),
        ("corpus", "teacher", "targets", *(f"bundle-{s}" for s in sizes),
         *(f"analysis-{s}" for s in sizes), *(f"export-{s}" for s in sizes)),
        {"repeats": plan["latency_repeats"]}))
    return stages


def _check_sizes(sizes: Sequence[str]) -> tuple[str, ...]:
    from distill.cli import shipped_configs

    configs = shipped_configs()
    unknown = [s for s in sizes if f"student-{s}" not in configs]
    if unknown or not sizes:
        known = sorted(n.removeprefix("student-") for n in configs if n.startswith("student-"))
        raise ValueError(f"unknown student size(s) {unknown or list(sizes)}; shipped: "
                         f"{', '.join(known)}")
    return tuple(dict.fromkeys(sizes))


def demo(
    out: Path = Path("runs/default"),
    seed: int = 0,
    corpus: Path | None = None,
    soundscape: Path | None = None,
    teacher: Path | None = None,
    teacher_config: Path | None = None,
    student_sizes: list[str] | None = None,
    accelerator: str = "auto",
    devices: int = 1,
    threads: int | None = None,
    resume: bool = True,
    quick: bool = False,
) -> int:
    """Run the whole pipeline into OUT: corpus, teacher, targets, students, ONNX FP32 / FP16 /
    INT8, bundles, analysis of a long soundscape, and the final table of accuracy, agreement
    with the teacher and latency. A rerun skips the stages already finished.

    Real data, the official weights and a GPU come in through the options: --corpus takes a
    manifest (JSONL / CSV with train / valid / test splits) instead of the synthetic chorus,
    --soundscape a long recording with its Raven table beside it, --teacher an existing
    teacher checkpoint (for example trained on a GPU, or the official NatureLM-audio weights
    saved as one), --teacher-config another LightningCLI YAML (the naturelm-8b config), and
    --accelerator gpu trains, labels and evaluates on the GPU.

    Args:
        out: output folder (corpus/, teacher/, targets/, students/, export/, bundles/,
            analysis/, stages/ markers, report.md, report.json, accuracy.png).
        seed: seed of the corpus and of every Lightning stage.
        corpus: a real manifest instead of the synthetic corpus.
        soundscape: a long recording to analyse with --corpus (scored when
            <stem>.selections.txt lies beside it).
        teacher: an existing teacher checkpoint instead of training the tiny teacher.
        teacher_config: the teacher's LightningCLI YAML or shipped name (default: tiny).
        student_sizes: student sizes to distill (shipped configs student-SIZE; default: s).
        accelerator: Lightning accelerator of the training and labelling (auto, cpu, gpu).
        devices: devices (processes) of the Lightning stages: with more than one, `teacher
            fit`, `distill label` and `distill fit` run as their own commands under DDP
            (default: one; on the CPU, the student trains in two processes where there are
            two or more cores, each with half the threads and half the batch).
        threads: torch threads of the training and labelling (default: every core this
            process may use) and ONNX Runtime threads of the analysis (default: one);
            latencies are always measured on one thread. Give 1 on a machine shared with
            other jobs (the shipped configs' setting: two threads per process spin while
            the other is descheduled).
        resume: skip stages finished by an earlier run with the same inputs.
        quick: a much smaller run (40 clips, half a minute of soundscape, an epoch or so).
    """
    if soundscape is not None and corpus is None:
        raise ValueError("--soundscape goes with --corpus (the synthetic corpus has its own)")
    options = Options(
        out=Path(out).resolve(), seed=seed, plan=PLANS["quick" if quick else "default"],
        corpus=Path(corpus).resolve() if corpus else None,
        soundscape=Path(soundscape).resolve() if soundscape else None,
        teacher=Path(teacher).resolve() if teacher else None,
        teacher_config=str(teacher_config) if teacher_config else "tiny",
        student_sizes=_check_sizes(student_sizes or ["s"]), accelerator=accelerator,
        devices=devices, threads=threads)
    options.out.mkdir(parents=True, exist_ok=True)
    begin = time.perf_counter()
    markers = run_stages(options.out, build_stages(options), resume)
    table = markers["table"]["outputs"]
    _say("")
    _say(Path(table["report"]).read_text().rstrip())
    times = {name: m["seconds"] for name, m in markers.items()}
    _say("\nstage times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in times.items())
         + f"; this run {time.perf_counter() - begin:.0f} s")
    from benchmarks.harness import json_line

    json_line({"demo": str(options.out), "stages_s": times, "models": table["models"],
               "soundscape": table["soundscape"], "rejected": table.get("rejected", [])})
    return 0
