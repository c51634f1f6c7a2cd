"""The stages of the flatness-mismatch study, and probing of trained runs, as library functions that
the scripts in ``analysis_scripts/`` call.

* :func:`probe_runs` — the probe suite on run folders written by :func:`flatlora.run`, resumable:
  each run's tables are a part (:class:`landscape.results.PartFiles`) keyed by the run's resolved
  path and fingerprinted by the run's files (config, metrics, weights) and every probe setting, so
  a part is reused only for the same run, trained the same way, probed the same way;
* :func:`task_figures` — every figure that a task's result tables allow;
* :func:`run_study` — train → probe → robustness → report, each stage resumable. Each finished
  run is published (:func:`publish_run`) as a committed unit RESULTS/TASK/units/METHOD-sSEED/ (a full
  fine-tuning run as a record: its weights only as a digest) and its probe and robustness parts live
  in RESULTS, keyed by the run's name and fingerprinted by its content: committed as it grows,
  RESULTS carries a long study from one machine to the next.

Under ``torchrun`` every rank calls these alike: training is data-parallel, each probe's work is
split over the ranks, the robustness runs are split across them; rank 0 writes the shared files.
"""
from __future__ import annotations

import hashlib
import os
import platform
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import pandas as pd
from torch import nn

from flatlora import TrainConfig, distributed, get_task, load_run, run
from flatlora.io import atomic_dir, atomic_write_json, atomic_write_text, read_json
from flatlora.training import RunExistsError

from ..curves import loss_plane
from ..loss import Loss
from ..plot import save_figure
from ..results import PartFiles, file_digest
from .error_analysis import compare_predictions
from .figures import (PLANE_METHODS, fig_eigenvalues, fig_expected_loss, fig_lines, fig_planes, fig_robustness,
                      fig_sharpness_vs_accuracy)
from .noise_top_up import check_top_up, held_zero, merge_top_up, top_up
from .report import (accuracy_section, claim_section, collect_metrics, expected_loss_section, markdown_table,
                     paired_tests_sections, robustness_section, runs_section, sharpness_section, within_method_section,
                     worst_case_section)
from .robustness import accuracy_drop, corruption_accuracy
from .suite import ProbeSettings, probe_model

__all__ = ["ProbeTarget", "probe_targets", "probe_runs", "run_target", "top_up_noise", "probe_adapters", "run_fingerprint", "publish_run", "PORTABLE_RUN_FILES", "WEIGHTS_DIGEST", "is_record", "RecordWithoutWeightsError", "restore_record_weights", "recorded_noise_pairs", "run_source", "unit_dir", "manifest", "draw_figures", "read_probe_tables", "task_figures", "run_study", "Recipe", "StudySettingsError", "differing_settings", "DEFAULT_METHODS", "STAGES"]

DEFAULT_METHODS = ("full-ft", "lora", "flat-lora", "sam-lora", "sam-full")
STAGES = ("train", "probe", "robust", "report")


def say(message: str) -> None:
    """Print once (rank 0 under torchrun)."""
    if distributed.is_main():
        print(message, flush=True)


WEIGHTS_DIGEST = "model.sha1"
"""The file in a published full fine-tuning run that stands for its weights: their :func:`file_digest`."""


def run_fingerprint(run_path: Path) -> dict:
    """Content hashes of what a finished run holds: its settings, metrics and trained weights (for
    a published full fine-tuning run, the digest its :data:`WEIGHTS_DIGEST` keeps: the same hash)."""
    run_path = Path(run_path)
    saved = next((run_path / n for n in ("adapter", "model") if (run_path / n).exists()), None)
    weights = file_digest(saved) if saved else (run_path / WEIGHTS_DIGEST).read_text().strip()
    return {"config": file_digest(run_path / "config.json"), "metrics": file_digest(run_path / "metrics.json"),
            "weights": weights}


def is_record(run_path: Path) -> bool:
    """A published full fine-tuning run: its settings, metrics and predictions, its weights only as a digest."""
    return (Path(run_path) / WEIGHTS_DIGEST).exists() and not (Path(run_path) / "model").exists()


class RecordWithoutWeightsError(FileNotFoundError):
    """A stage needs the weights of runs committed only as records (:func:`is_record`)."""


def require_weights(records: Sequence[Path], stage: str) -> None:
    """Before any work: :class:`RecordWithoutWeightsError` naming ``records`` (runs whose ``stage``
    part is missing or was made otherwise, and whose weights are not here), and the fix."""
    if records:
        names = ", ".join(str(r) for r in records)
        raise RecordWithoutWeightsError(
            f"the {stage} stage needs the weights of {names}, committed as records without them (full "
            f"fine-tuning; {WEIGHTS_DIGEST} keeps their digest) and with no {stage} part made with these files "
            "and settings: train them again (--stage train --retrain-records; their weights must come out "
            "bit-identical), or leave their method out of --methods")


def restore_record_weights(record: Path, dest: Path, cfg: TrainConfig, progress: bool) -> None:
    """Give the record ``record`` (:func:`is_record`) its weights back in ``dest``: train ``cfg`` (the
    record's run) again in a scratch folder beside ``dest`` and, only if the weights' digest is the
    record's :data:`WEIGHTS_DIGEST` (the same seed on the same software gives the same weights, see
    :func:`flatlora.run`), make ``dest`` the record's own files with those weights: its
    :func:`run_fingerprint` is then the record's, and its committed parts keep serving it. Other
    weights are a :class:`StudySettingsError` that replaces nothing (the committed parts describe the
    record's weights, not these); the scratch run stays for a look. A scratch run already finished
    there (an earlier call's) is checked, not trained again."""
    scratch = dest.with_name(f"{dest.name}.retrain")
    if (scratch / "metrics.json").exists():
        say(f"[study] {scratch} holds a finished retraining of {record}: checking its weights")
    else:
        say(f"[study] train {record} again ({cfg.steps} steps) → {scratch}, for its weights")
        run(cfg, scratch, progress=progress)
    got, want = file_digest(scratch / "model"), (record / WEIGHTS_DIGEST).read_text().strip()
    if got != want:
        raise StudySettingsError(f"training {record} again gave other weights (digest {got}, its record's {want}; "
                                 f"other software or threads?): its committed parts describe the record's weights, so "
                                 f"nothing is replaced; the new run is in {scratch} (delete it to train again)")
    with atomic_dir(dest) as tmp:
        copy_run_files(record, tmp)
        os.replace(scratch / "model", tmp / "model")
    shutil.rmtree(scratch)


PORTABLE_RUN_FILES = ("config.json", "metrics.json", "labels.json", "predictions.json", "adapter")


def publish_run(run_path: Path, dest: Path) -> None:
    """Copy what a finished LoRA-family run needs to be loaded again (:data:`PORTABLE_RUN_FILES`: its
    settings, metrics, labels, test predictions and peft adapter, a few MB; not a checkpoint) into
    ``dest``, replacing what was there only once the copy is whole. ``dest`` is then itself a run
    folder that :func:`flatlora.load_run` reads on any machine (its base-model path made relative,
    :func:`relative_base_model`): a study commits these so that its work survives a new machine.

    A full fine-tuning run (``model/``, the whole network: no small output) is published as a
    *record* (:func:`is_record`): the same files, and in place of its weights their digest
    (:data:`WEIGHTS_DIGEST`), so that :func:`run_fingerprint` is the run's own and its committed
    probe parts keep serving the report; probing it again needs the weights, i.e. training again."""
    run_path = Path(run_path)
    if not (run_path / "metrics.json").exists():
        raise FileNotFoundError(f"{run_path} holds no finished run (no metrics.json): nothing to publish")
    lora = (run_path / "adapter").is_dir()
    if not lora and not (run_path / "model").is_dir():
        raise FileNotFoundError(f"{run_path} has neither adapter/ nor model/: its trained weights are missing")
    with atomic_dir(dest) as tmp:
        copy_run_files(run_path, tmp)
        if lora:
            relative_base_model(tmp / "adapter", Path(dest) / "adapter")
        else:
            (tmp / WEIGHTS_DIGEST).write_text(file_digest(run_path / "model") + "\n")


def copy_run_files(src: Path, dest: Path) -> None:
    """Copy those of :data:`PORTABLE_RUN_FILES` that the run folder ``src`` holds into ``dest``."""
    for name in PORTABLE_RUN_FILES:
        if (src / name).is_dir():
            shutil.copytree(src / name, dest / name)
        elif (src / name).exists():
            shutil.copy2(src / name, dest / name)


def relative_base_model(adapter: Path, final: Path) -> None:
    """Rewrite the absolute base-model path that peft's ``save_pretrained`` writes into
    ``adapter_config.json`` and the card ``README.md`` as a path relative to ``final`` (where the
    adapter folder will live), so that committed results hold no machine's paths. :func:`flatlora.load_run`
    rebuilds the base model from the task and does not read it."""
    base = read_json(adapter / "adapter_config.json").get("base_model_name_or_path")
    if not base or not os.path.isabs(base):
        return
    rel = Path(os.path.relpath(base, Path(final).resolve())).as_posix()
    for name in ("adapter_config.json", "README.md"):
        if (adapter / name).exists():
            (adapter / name).write_text((adapter / name).read_text().replace(base, rel))


def _part_key(run_path: Path) -> str:
    resolved = str(run_path.resolve())
    return f"{run_path.name}-{hashlib.sha1(resolved.encode()).hexdigest()[:12]}"


def _relative(path: Path, to: Path) -> str:
    """``path`` relative to the folder ``to`` (results meant to be committed carry no machine's paths)."""
    return Path(os.path.relpath(path.resolve(), to.resolve())).as_posix()


@dataclass
class ProbeTarget:
    """One model to probe: its folder (naming its part and its rows), the content hashes of what it
    is made of, and how to load it: ``load() -> (model, loss, tags, lora_targets)``. ``key`` names its
    part when the folder's name alone is not unique enough: by default the name and a hash of the
    resolved path (a part then belongs to this machine's folder); a study's runs, named
    METHOD-sSEED within a task's parts, are keyed by name, so that committed parts serve any machine
    (their files' content hashes still decide reuse)."""

    path: Path
    files: dict
    load: Callable[[], tuple[nn.Module, Loss, dict, Optional[Sequence[str]]]]
    key: Optional[str] = None

    def fingerprint(self, settings: ProbeSettings, data: dict) -> dict:
        """What its part is reused for: its files (and its path, without a ``key``), the suite's settings, ``data``."""
        where = {"path": str(self.path.resolve())} if self.key is None else {}
        return {**where, "files": self.files, "settings": settings.as_dict(), **data}

    def part_key(self) -> str:
        return self.key or _part_key(self.path)


def probe_targets(targets: Sequence[ProbeTarget], out: Path, settings: ProbeSettings, data: dict,
                  progress: bool = False, parts: Optional[Path] = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Probe each target, resuming from ``parts`` (default ``OUT.parts/``), then write ``out``
    (measures) and ``OUT-curves.csv`` atomically; return both frames. Rows carry the target's tags
    and its path relative to ``out``'s folder (``run``).

    A target's part is keyed by its resolved path (or its ``key``) and reused only when its files,
    every suite setting and ``data`` (what the loss is made of: split or file, examples, batch size)
    are those it was made with; otherwise it is probed again and its part replaced."""
    out = Path(out)
    parts = PartFiles(parts or out.with_name(out.name + ".parts"), names=("measures", "curves"))
    require_weights([t.path for t in targets if is_record(t.path)
                     and not parts.reusable(t.part_key(), t.fingerprint(settings, data))], "probe")
    measures, curves = [], []
    for target in targets:
        def compute(target=target) -> dict[str, pd.DataFrame]:
            model, loss, tags, lora_targets = target.load()
            ranks = distributed.world_size()
            say(f"[probe] {target.path} ({', '.join(f'{k} {v}' for k, v in tags.items())}) on {loss.total} "
                f"examples{f' on {ranks} processes' if ranks > 1 else ''}")
            m, c = probe_model(model, loss, settings, lora_targets=lora_targets,
                               progress=progress and distributed.is_main())
            return {"measures": m.assign(**tags), "curves": c.assign(**tags)}

        tables = parts.get(target.part_key(), target.fingerprint(settings, data), compute)
        rel = _relative(target.path, out.parent)
        measures.append(tables["measures"].assign(run=rel))
        curves.append(tables["curves"].assign(run=rel))
    m_all, c_all = pd.concat(measures, ignore_index=True), pd.concat(curves, ignore_index=True)
    if distributed.is_main():
        atomic_write_text(out, m_all.to_csv(index=False))
        atomic_write_text(out.with_name(out.stem + "-curves.csv"), c_all.to_csv(index=False))
    distributed.barrier()
    return m_all, c_all


def probe_runs(runs: Sequence[str | os.PathLike], out: Path, settings: ProbeSettings, split: str, examples: int,
               batch_size: int, progress: bool = False, parts: Optional[Path] = None, by_name: bool = False
               ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """:func:`probe_targets` on run folders written by :func:`flatlora.run`, each on the first
    ``examples`` examples of its task's ``split`` (the same batches for every run of a task);
    rows tagged with task, method and seed. ``by_name``: parts keyed by the runs' folder names
    (unique among ``runs``), not by where they are."""
    return probe_targets([run_target(Path(r), split, examples, batch_size, by_name) for r in runs], out, settings,
                         {"split": split, "examples": examples, "batch_size": batch_size}, progress, parts)


def run_target(run_path: Path, split: str, examples: int, batch_size: int, by_name: bool = False) -> ProbeTarget:
    """A run folder of :func:`flatlora.run` as a :class:`ProbeTarget`, probed on the first ``examples``
    examples of its task's ``split``; tagged with task, method and seed."""
    def load():
        model, task, cfg = load_run(run_path)
        loss = Loss(task.batches(split, batch_size, limit=examples))
        return model, loss, {"task": cfg["task"], "method": cfg["method"], "seed": cfg["seed"]}, task.lora_targets

    return ProbeTarget(run_path, run_fingerprint(run_path), load, run_path.name if by_name else None)


def probe_adapters(base_model: str | os.PathLike, adapters: Sequence[str | os.PathLike], data: str | os.PathLike,
                   out: Path, settings: ProbeSettings, *, text_column: str = "text", label_column: str = "label",
                   examples: int = 64, batch_size: int = 32, max_length: int = 128, progress: bool = False,
                   parts: Optional[Path] = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """:func:`probe_targets` on peft LoRA adapters saved anywhere (``save_pretrained`` folders), each
    loaded on the local Hugging Face model folder ``base_model`` (:func:`flatlora.adapters.load_adapter`,
    which refuses an adapter that does not fit it), all on the same batches: the first ``examples``
    rows of the CSV or JSON-lines file ``data``. Labels are the adapter's class ids, or names listed
    in a ``labels.json`` beside the adapter (as train.py writes). Rows are tagged task = the data
    file's name, method = the adapter folder's name."""
    from flatlora.adapters import adapter_labels, load_adapter
    from flatlora.tasks.text import file_task

    adapters = [Path(a) for a in adapters]
    labels = {str(a): adapter_labels(a) for a in adapters}
    if len({tuple(v) if v else None for v in labels.values()}) > 1:
        raise ValueError(f"the adapters name different labels ({labels}); probe them separately")
    task = file_task(base_model, data, text_column=text_column, label_column=label_column,
                     label_names=labels[str(adapters[0])], max_length=max_length)
    loss = Loss(task.batches("data", batch_size, limit=examples))
    base_files = file_digest(base_model)

    def target(adapter: Path) -> ProbeTarget:
        def load():
            return load_adapter(base_model, adapter), loss, {"task": Path(data).stem, "method": adapter.name}, None

        return ProbeTarget(adapter, {"adapter": file_digest(adapter), "base": base_files}, load)

    return probe_targets([target(a) for a in adapters], out, settings,
                         {"data": file_digest(data), "columns": [text_column, label_column], "examples": examples,
                          "batch_size": batch_size, "max_length": max_length}, progress, parts)


def manifest(settings: ProbeSettings, runs, out: Path, split: str, examples: int, batch_size: int,
             command: str) -> dict:
    """What made a probe table: settings, runs (relative to the table's folder), versions, and the
    ``command`` that wrote it (the caller's, so that a script called in-process names itself)."""
    import peft
    import torch
    import transformers

    return {"settings": settings.as_dict(), "runs": [_relative(Path(r), Path(out).parent) for r in runs],
            "split": split, "examples": examples, "batch_size": batch_size,
            "versions": {"torch": torch.__version__, "peft": peft.__version__,
                         "transformers": transformers.__version__, "python": platform.python_version()},
            "world_size": distributed.world_size(), "command": command}


FIGURE_TABLES = ("metrics", "probes", "curves", "planes", "robustness")


def draw_figures(tables: dict[str, Optional[pd.DataFrame]], figures: Path, task: str
                 ) -> tuple[list[Path], list[tuple[str, str]]]:
    """Every figure that ``tables`` (any of :data:`FIGURE_TABLES`: None or absent for a missing one)
    allow, saved as ``figures/TASK-NAME.{png,pdf}`` (the loss planes of LoRA, Flat-LoRA and SAM in
    one figure, ``TASK-planes``). Returns (paths made, [(figure, why it was skipped)]), so a caller can say what
    it could not draw."""
    t = {name: tables.get(name) for name in FIGURE_TABLES}
    has = lambda name, col=None, value=None: t[name] is not None and len(t[name]) > 0 and (  # noqa: E731
        col is None or (t[name][col] == value).any())
    made, skipped = [], []

    def draw(name: str, ok: bool, why: str, make) -> None:
        if not ok:
            skipped.append((f"{task}-{name}", why))
            return
        made.extend(save_figure(make(), figures / f"{task}-{name}"))

    draw("lines", has("curves"), "no loss-line curves (the probe's OUT-curves.csv)",
         lambda: fig_lines(t["curves"], task=task))
    draw("planes", has("planes") and t["planes"]["method"].isin(PLANE_METHODS).any(),
         f"no loss planes of {', '.join(PLANE_METHODS)} (planes.csv, written by the study's probe stage)",
         lambda: fig_planes(t["planes"], task=task))
    draw("expected-loss", has("probes", "measure", "expected_loss"), "no expected_loss rows in the probes",
         lambda: fig_expected_loss(t["probes"], task=task))
    draw("eigenvalues", has("probes", "measure", "eigenvalue"), "no eigenvalue rows in the probes",
         lambda: fig_eigenvalues(t["probes"], task=task))
    draw("sharpness-vs-accuracy", has("probes", "measure", "eigenvalue") and has("metrics"),
         "no accuracies (give --metrics, or probe run folders that hold metrics.json)",
         lambda: fig_sharpness_vs_accuracy(t["probes"], t["metrics"], task=task))
    draw("robustness", has("robustness"), "no robustness table (robustness.csv, from the study's robust stage)",
         lambda: fig_robustness(t["robustness"], task=task))
    return made, skipped


def task_figures(task_dir: Path, figures: Path) -> list[Path]:
    """Every figure the study's tables in ``task_dir`` (metrics, probes, probes-curves, planes,
    robustness CSVs) allow, as PNG and PDF under ``figures``; returns their paths."""
    read = lambda name: pd.read_csv(task_dir / name) if (task_dir / name).exists() else None  # noqa: E731
    tables = {"metrics": read("metrics.csv"), "probes": read("probes.csv"), "curves": read("probes-curves.csv"),
              "planes": read("planes.csv"), "robustness": read("robustness.csv")}
    return draw_figures(tables, figures, task_dir.name)[0]


PROBE_COLUMNS = ("space", "measure", "x", "value")


def read_probe_tables(probes: Path, *, curves: Optional[Path] = None, metrics: Optional[Path] = None,
                      planes: Optional[Path] = None, robustness: Optional[Path] = None) -> dict[str, dict]:
    """The tables of a probe CSV written by :func:`probe_runs` (its curves from ``PROBES-curves.csv``
    beside it unless given), split by task: ``{task: {"probes": …, "curves": …, "metrics": …}}``.
    Accuracies come from ``metrics`` (a CSV with task, method, seed, accuracy) or else from the
    metrics.json of the probed run folders, when they are there. Raises ValueError naming the
    file for a table that is missing or not of the expected kind."""
    probes = Path(probes)
    curves = Path(curves) if curves else probes.with_name(probes.stem + "-curves.csv")
    tables = {"probes": _read_csv(probes, PROBE_COLUMNS, "a probe table (written by probe.py --out)")}
    tables["curves"] = _read_csv(curves, ("alpha", "loss", "space"), "loss-line curves") if curves.exists() else None
    if metrics:
        tables["metrics"] = _read_csv(Path(metrics), ("task", "method", "seed", "accuracy"), "a metrics table")
    elif "run" in tables["probes"].columns:
        folders = [probes.parent / r for r in tables["probes"]["run"].dropna().unique()]
        found = collect_metrics([f for f in folders if (f / "metrics.json").exists()])
        tables["metrics"] = found if len(found) else None
    for name, path in (("planes", planes), ("robustness", robustness)):
        tables[name] = _read_csv(Path(path), (), name) if path else None
    tasks = tables["probes"]["task"].unique() if "task" in tables["probes"].columns else ["probes"]
    return {str(task): {name: (frame if frame is None or "task" not in frame.columns else frame[frame["task"] == task])
                        for name, frame in tables.items()} for task in tasks}


def _read_csv(path: Path, columns: Sequence[str], what: str) -> pd.DataFrame:
    if not path.is_file():
        raise ValueError(f"{path} does not exist (expected {what})")
    try:
        frame = pd.read_csv(path)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not a CSV file ({what}): {e}") from None
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{path} lacks the column(s) {missing}: it is not {what}")
    return frame


# ------------------------------------------------------------------------------------ the study
def run_dir(out: Path, task: str, method: str, seed: int) -> Path:
    return out / task / f"{method}-s{seed}"


def unit_dir(results: Path, task: str, method: str, seed: int) -> Path:
    """Where a study's finished run is committed (:func:`publish_run`): RESULTS/TASK/units/METHOD-sSEED."""
    return Path(results) / task / "units" / f"{method}-s{seed}"


def run_source(out: Path, results: Path, task: str, method: str, seed: int) -> Optional[Path]:
    """The finished run of TASK × METHOD × SEED: its committed unit in RESULTS when it holds its weights
    (the same files on every machine), else OUT/TASK/METHOD-sSEED when it finished here, else the
    unit as a record (:func:`is_record`: full fine-tuning, whose weights are not committed), else None."""
    finished = [d for d in (unit_dir(results, task, method, seed), run_dir(out, task, method, seed))
                if (d / "metrics.json").exists()]
    return next((d for d in finished if not is_record(d)), finished[0] if finished else None)


def _publish(run_path: Path, unit: Path) -> None:
    """Commit-ready copy of a finished run (rank 0), unless it is read from its unit already."""
    if distributed.is_main() and run_path != unit:
        publish_run(run_path, unit)


class StudySettingsError(ValueError):
    """A run folder holds a run trained otherwise than the study now asks (its results would be mixed in)."""


def differing_settings(run_path: Path, wanted: dict) -> list[str]:
    """The keys of ``wanted`` (TrainConfig fields) whose value differs from the finished run's config.json."""
    saved = read_json(Path(run_path) / "config.json")
    return sorted(k for k, v in wanted.items() if saved.get(k) != v)


@dataclass(frozen=True)
class Recipe:
    """How the study trains beyond task, method, seed and steps (``None``: TrainConfig's default):
    the LoRA-family learning rate (full fine-tuning keeps its own), where LoRA goes
    (``lora_targets``, e.g. "all-linear"), Flat-LoRA's σ and schedule, and SAM's ρ on (A, B)
    (``rho_lora``) and on the merged weights (``rho_full``)."""

    lr: Optional[float] = None
    lora_targets: Optional[str] = None
    sigma: Optional[float] = None
    schedule: Optional[str] = None
    rho_lora: Optional[float] = None
    rho_full: Optional[float] = None

    def fields(self, method: str) -> dict:
        """The TrainConfig fields this recipe sets for ``method``."""
        given = {"lr": self.lr if method != "full-ft" else None,
                 "task_options": {"lora_targets": self.lora_targets} if self.lora_targets else None,
                 "sigma": self.sigma if method == "flat-lora" else None,
                 "schedule": self.schedule if method == "flat-lora" else None,
                 "rho": {"sam-lora": self.rho_lora, "sam-full": self.rho_full}.get(method)}
        return {k: v for k, v in given.items() if v is not None}


def train_all(out: Path, results: Path, tasks, methods, seeds, steps: dict, progress: bool,
              recipe: Recipe = Recipe(), retrain_records: bool = False) -> None:
    """Train every task × method × seed that has no finished run (:func:`run_source`; an interrupted one
    resumes), and publish each finished run as its unit in RESULTS (commit it: a new
    machine goes on from there). A finished run trained with other settings is a
    :class:`StudySettingsError`: it would be reused as if it were this study's. ``retrain_records``:
    each run that is only a record here gets its weights back in OUT (:func:`restore_record_weights`)."""
    for task in tasks:  # method-major: every seed of the first methods before the next method
        for method in methods:
            fields = recipe.fields(method)
            for seed in seeds:
                d = distributed.broadcast_object(run_source(out, results, task, method, seed))
                cfg = TrainConfig(task=task, method=method, seed=seed, steps=steps[task], **fields)
                if d is not None:
                    differ = differing_settings(d, {k: getattr(cfg, k) for k in ("method", "seed", "steps", *fields)})
                    if differ:
                        raise StudySettingsError(f"{d} holds a finished run trained with other {differ}; delete it "
                                                 "or pass another --out or --results")
                    if retrain_records and is_record(d):
                        restore_record_weights(d, run_dir(out, task, method, seed), cfg, progress)
                else:
                    d = run_dir(out, task, method, seed)
                    say(f"[study] train {task} {method} seed {seed} ({steps[task]} steps) → {d}")
                    try:
                        run(cfg, d, progress=progress)
                    except RunExistsError as e:  # an interrupted run with other settings
                        raise StudySettingsError(f"{e}; or delete {d}, or pass another --out") from None
                _publish(d, unit_dir(results, task, method, seed))


def finished_runs(out: Path, results: Path, task: str, methods, seeds) -> list[Path]:
    return [d for s in seeds for m in methods if (d := run_source(out, results, task, m, s)) is not None]


def probe_all(out: Path, results: Path, task: str, runs: list[Path], settings: ProbeSettings, split: str,
              examples: int, batch_size: int, command: str, noise_pairs: int = 0) -> None:
    """The probe suite on every run, and 21 × 21 loss planes (merged space) of seed 0 of each of
    :data:`~landscape.study.figures.PLANE_METHODS` that has a run. ``noise_pairs`` > 0: each run's ΔL
    cells whose interval holds 0 get that many antithetic pairs in all (:func:`top_up_noise`)."""
    res = results / task
    res.mkdir(parents=True, exist_ok=True)
    measures, _ = probe_runs(runs, res / "probes.csv", settings, split, examples, batch_size,
                             parts=res / "probe-parts", by_name=True)
    if noise_pairs:
        measures = top_up_noise(res, runs, measures, settings, split, examples, batch_size, noise_pairs)
        if distributed.is_main():
            atomic_write_text(res / "probes.csv", measures.to_csv(index=False))
    if distributed.is_main():
        made = manifest(settings, as_committed(results, task, runs), res / "probes.csv", split, examples, batch_size,
                        command)
        atomic_write_json(res / "probes-manifest.json", {**made, "noise_pairs": noise_pairs} if noise_pairs else made)
    planes = []
    for method in PLANE_METHODS:
        d = run_source(out, results, task, method, 0)
        if d is None:
            continue
        model, t, _ = load_run(d)
        loss = Loss(t.batches(split, batch_size, limit=examples))
        frame = loss_plane(model, loss, space="merged", grid=21, span=1.0, seed=0,
                           results_path=res / "plane-parts" / f"{method}-s0.json", progress=False)
        planes.append(frame.assign(task=task, method=method, seed=0))
    if planes and distributed.is_main():
        atomic_write_text(res / "planes.csv", pd.concat(planes, ignore_index=True).to_csv(index=False))


def as_committed(results: Path, task: str, runs: list[Path]) -> list[Path]:
    """Each of ``runs`` named by its committed unit when that is the same run (a full fine-tuning run
    probed from OUT, where its weights are, and its record: equal :func:`run_fingerprint`), so that
    a committed manifest names no one machine's folders."""
    named = []
    for d in runs:
        cfg = read_json(d / "config.json")
        unit = unit_dir(results, task, cfg["method"], cfg["seed"])
        same = unit != d and (unit / "metrics.json").exists() and run_fingerprint(unit) == run_fingerprint(d)
        named.append(unit if same else d)
    return named


def recorded_noise_pairs(res: Path) -> int:
    """The ΔL top-up (pairs) that made RES/probes.csv, as its probes-manifest.json records it; 0
    without a manifest or a top-up."""
    path = res / "probes-manifest.json"
    return int(read_json(path).get("noise_pairs", 0)) if path.exists() else 0


def top_up_noise(res: Path, runs: list[Path], measures: pd.DataFrame, settings: ProbeSettings, split: str,
                 examples: int, batch_size: int, pairs: int) -> pd.DataFrame:
    """``measures`` (the probe parts' rows of ``runs``) with every run's ΔL cells whose interval holds 0
    extended to ``pairs`` antithetic pairs (:mod:`~landscape.study.noise_top_up`), one part per run
    with such cells in RES/noise-parts/, keyed by the run's name and fingerprinted by its files, the
    suite's settings, the data, ``pairs`` and the cells; every ΔL row gets its ``samples``."""
    check_top_up(settings, pairs)
    parts = PartFiles(res / "noise-parts", names=("noise",))
    data = {"split": split, "examples": examples, "batch_size": batch_size}
    targets, merged = {}, []
    for d in runs:
        cfg = read_json(d / "config.json")
        mine = (measures["method"] == cfg["method"]) & (measures["seed"] == cfg["seed"])
        cells = held_zero(measures[mine])
        fingerprint = {"files": run_fingerprint(d), "settings": settings.as_dict(), **data, "pairs": pairs,
                       "cells": [list(c) for c in cells]}
        targets[d] = (mine, cells, fingerprint)
    require_weights([d for d, (_, cells, f) in targets.items()
                     if cells and is_record(d) and not parts.reusable(d.name, f)], "probe (noise top-up)")
    for d, (mine, cells, fingerprint) in targets.items():
        def compute(d=d, cells=cells) -> dict[str, pd.DataFrame]:
            model, loss, _, lora_targets = run_target(d, split, examples, batch_size).load()
            say(f"[probe] {d}: {pairs} noise pairs for {len(cells)} ΔL cell(s) whose interval holds 0")
            return {"noise": top_up(model, loss, settings, cells, pairs, lora_targets)}

        extra = parts.get(d.name, fingerprint, compute)["noise"] if cells else None
        merged.append(merge_top_up(measures[mine], extra, int(settings.noise_max_samples)))
    return pd.concat(merged, ignore_index=True)


def robust_all(results: Path, task: str, runs: list[Path], limit: int) -> None:
    """Accuracy under corruptions, one part per run (under torchrun: the runs split across ranks)."""
    parts = PartFiles(results / task / "robust-parts", names=("robustness",))
    fingerprint = {d: {"files": run_fingerprint(d), "limit": limit} for d in runs}
    require_weights([d for d in runs if is_record(d) and not parts.reusable(d.name, fingerprint[d])], "robust")
    for d in distributed.shard(runs):
        def compute(d=d) -> dict[str, pd.DataFrame]:
            model, t, cfg = load_run(d)
            print(f"[study] corruptions on {d}", flush=True)
            frame = corruption_accuracy(model, t, limit=limit)
            return {"robustness": frame.assign(task=task, method=cfg["method"], seed=cfg["seed"])}

        parts.get(d.name, fingerprint[d], compute, collective=False)
    distributed.barrier()
    if distributed.is_main():
        robust = pd.concat([parts.read(d.name)["robustness"] for d in runs], ignore_index=True)
        # parts written before accuracy_drop carry the float difference's rounding: the drop again, exactly
        robust = robust.assign(drop=accuracy_drop(robust["clean_accuracy"], robust["accuracy"], robust["n"]))
        atomic_write_text(results / task / "robustness.csv", robust.to_csv(index=False))
    distributed.barrier()


def error_section(out: Path, results: Path, task: str, seeds) -> str:
    """LoRA vs Flat-LoRA on the same test examples, per seed (the pairs share the data order)."""
    t = get_task(task)
    labels = [e["label"] for e in t.splits["test"]]
    rows, shown = [], None
    for s in seeds:
        a, b = run_source(out, results, task, "lora", s), run_source(out, results, task, "flat-lora", s)
        if a is None or b is None or not ((a / "predictions.json").exists() and (b / "predictions.json").exists()):
            continue
        counts, table = compare_predictions(labels, read_json(a / "predictions.json")["predictions"],
                                            read_json(b / "predictions.json")["predictions"], names=("lora", "flat-lora"),
                                            texts=t.texts.get("test"), label_names=t.label_names)
        rows.append({"seed": s, **counts})
        shown = table if shown is None else shown
    if not rows:
        return "(no paired runs)"
    lines = [markdown_table(pd.DataFrame(rows)), ""]
    if shown is not None and len(shown):
        lines += ["Examples (first seed):", ""]
        lines += [f"- *{r.kind}* — label **{r.label}**: \"{str(r.text)[:160]}\"" for r in shown.itertuples()]
    return "\n".join(lines)


def _read_runs_table(path: Path, metrics: pd.DataFrame) -> Optional[pd.DataFrame]:
    """The rows of the CSV ``path`` (probes, robustness) for the runs in ``metrics``; None without one."""
    return pd.read_csv(path).merge(metrics[["method", "seed"]], on=["method", "seed"]) if path.exists() else None


def _probes_made_by(task_results: Path) -> list[str]:
    """The line naming the command that wrote the task's probes.csv (its probes-manifest.json), which
    may differ from the report's own (a --noise-pairs top-up, say); none without a manifest."""
    path = task_results / "probes-manifest.json"
    return [f"Probes (`probes.csv`) made by `{read_json(path)['command']}`.", ""] if path.exists() else []


def report(out: Path, results: Path, figures: Path, tasks, methods, seeds, command: str) -> Path:
    """Figures and RESULTS/report.md from what the earlier stages wrote, per task, for the runs of
    ``methods`` × ``seeds`` that are finished: every run (steps, accuracies, wall time); mean ± std
    over seeds of accuracy, sharpness per space (the headline measures, the worst case beside its
    first-order term, ΔL with its Monte-Carlo interval) and robustness; every method against LoRA
    paired by seed, and SAM on A, B against SAM on W (the claim's direct test), Holm-adjusted over
    both tables (one family per task, :func:`~landscape.study.report.paired_tests_sections`); λ₁
    against accuracy within each method; λ₁ in one space against another across runs; the error
    analysis; the figures. With one seed the intervals and tests are "—"."""
    sections = ["# Flatness-mismatch study", "", f"Made by `{command}`.", ""]
    for task in tasks:
        runs = finished_runs(out, results, task, methods, seeds)
        if not runs:
            continue
        res = results / task
        metrics = collect_metrics(runs)
        atomic_write_text(res / "metrics.csv", metrics.drop(columns="run").to_csv(index=False))
        made = task_figures(res, figures)
        probes = _read_runs_table(res / "probes.csv", metrics)
        robust = _read_runs_table(res / "robustness.csv", metrics)
        sections += [f"## {task}", "", "### Runs", "", runs_section(metrics), "",
                     "### Accuracy (mean ± std over seeds)", "", accuracy_section(metrics), ""]
        if probes is not None:
            sections += _probes_made_by(res)
            sections += ["### Sharpness per space (mean ± std over seeds)", "", sharpness_section(probes), "",
                         "### Worst case and its first-order term", "", worst_case_section(probes), "",
                         "### Expected loss under Gaussian weight noise", "", expected_loss_section(probes), ""]
        if robust is not None:
            sections += ["### Robustness to messy input", "", robustness_section(robust), ""]
        sections += paired_tests_sections(metrics, probes, robust)
        if probes is not None:
            sections += ["### λ₁ against test accuracy, within each method", "", within_method_section(metrics, probes),
                         "", "### One space against another, across runs", "", claim_section(probes), ""]
        sections += ["### Error analysis: LoRA vs Flat-LoRA", "",
                     "Per seed, on the same test examples; McNemar's p of each seed is descriptive, not among the "
                     "tests above.", "", error_section(out, results, task, seeds), ""]
        pngs = [f"![{p.stem}]({_relative(p, results)})" for p in made if p.suffix == ".png"]
        sections += (["### Figures", ""] + pngs + [""]) if pngs else []
    path = results / "report.md"
    atomic_write_text(path, "\n".join(sections))
    return path


def run_study(out: Path, results: Path, figures: Path, *, tasks: Sequence[str], methods: Sequence[str],
              seeds: Sequence[int], steps: dict, stages: Sequence[str], settings: ProbeSettings, split: str,
              examples: int, batch_size: int, robust_examples: int, progress: bool, command: str,
              recipe: Recipe = Recipe(), noise_pairs: Optional[int] = None, retrain_records: bool = False) -> None:
    """The stages in order (each skips what is already done): ``train`` every task × method × seed
    into OUT/TASK/METHOD-sSEED/ and publish each run to RESULTS/TASK/units/METHOD-sSEED/,
    ``probe`` them (RESULTS/TASK/probes.csv, planes.csv; parts in RESULTS/TASK/probe-parts/ and
    plane-parts/; with ``noise_pairs``, the ΔL cells whose interval holds 0 extended to that many
    pairs, parts in noise-parts/; None: the top-up that the task's probes-manifest.json records, so
    that probing again keeps it; 0: none), ``robust`` (RESULTS/TASK/robustness.csv; parts in robust-parts/),
    ``report`` (figures and RESULTS/report.md). Every stage reads a run from its committed unit when
    there is one, so that RESULTS, committed as it grows, carries the study to a new machine."""
    out, results = Path(out), Path(results)
    pairs = {task: recorded_noise_pairs(results / task) if noise_pairs is None else noise_pairs for task in tasks}
    for task, n in pairs.items():
        if n and "probe" in stages:
            try:
                check_top_up(settings, n)
            except ValueError as e:
                inherited = (f" ({task}'s probes-manifest.json records this top-up; --noise-pairs 0 drops it)"
                             if noise_pairs is None else "")
                raise StudySettingsError(f"{e}{inherited}") from None
    if "train" in stages:
        train_all(out, results, tasks, methods, seeds, steps, progress=progress, recipe=recipe,
                  retrain_records=retrain_records)
    for task in tasks:
        runs = finished_runs(out, results, task, methods, seeds)
        if "probe" in stages and runs:
            made_by = command
            if noise_pairs is None and pairs[task]:  # the table keeps its top-up, and its manifest says how
                say(f"[probe] {task}: keeping the {pairs[task]}-pair ΔL top-up that its probes-manifest.json "
                    f"records (--noise-pairs 0 drops it)")
                made_by = f"{command} --noise-pairs {pairs[task]}"
            probe_all(out, results, task, runs, settings, split, examples, batch_size, made_by, pairs[task])
        if "robust" in stages and runs and get_task(task).encode is not None:
            robust_all(results, task, runs, robust_examples)
    if "report" in stages and distributed.is_main():
        say(f"[study] report: {report(out, results, Path(figures), tasks, methods, seeds, command)}")
