"""report.json (the source of truth other tools read) and report.md (for people).

Keys of report.json (stable: other tools read them)::

    version, machine{cpu, isa[], cores, onnxruntime, os}, recipe,
    input{stats}, output{stats},
    steps[{pass, params, seconds, modified, before, after, notes[],
           accuracy{top1, agreement, cosine, n, score, score_name, drop}}],
    benchmark[{model, threads, batch, p50_ms, p90_ms, p99_ms, mean_ms, std_ms, throughput_ips, speedup}],
    accuracy{input{top1,...}, output{top1,...}, agreement, metric, score_in, score_out, drop,
             metrics[{outputs, kind, metric, base, score, drop}]},
    gates[{name, limit, value, passed, metric (max_accuracy_drop)}]

The accuracy figures are ``deployopt.measure.judge`` verdicts against the input model: ``metric``
names the task metric with the largest drop (``top1`` for a labelled classifier), ``score_in`` /
``score_out`` its value for the input and the output, ``drop`` the number the
``max_accuracy_drop`` gate reads.

plus ``normalization[{action, count, what, why}]`` (rewrites of the input model on load, see
``deployopt.core.normalize``), ``exit_code``, ``reason`` (why the run failed, or null), ``warnings`` and ``seconds``.
Numbers stay numbers; formatting happens only in report.md and on the terminal. ``Report`` is
the same document as a typed object, what ``deployopt.optimize`` returns. Every text in it (and
every error a run raises) names the user's files and recipe keys, never the run's staging or
working files: ``UserPaths`` rewrites those.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import re
from typing import Any

import deployopt
from deployopt.core import io


def _machine() -> dict[str, Any]:
    from deployopt.measure.machine import stamp

    return stamp()


class UserPaths:
    """Rewrites the run's internal paths in a text into what the user knows.

    ``add(path, name)``: the file or folder ``path`` reads ``name`` (a folder's files keep their
    relative path: the staging folder becomes the output folder). ``add_scratch(folder, name)``:
    any file under ``folder`` (the run's working folder, a pass's private folder, onnxruntime's
    temporary folders inside them) reads ``<file name> (<name>)``. Longer paths win.
    """

    # the folder itself (not a longer name that starts like it), then the rest of the path
    _TAIL = r"(?![^/\s'\"`:,;()\[\]{}])(?:/[^\s'\"`:,;()\[\]{}]*)?"

    def __init__(self) -> None:
        self._exact: dict[str, str] = {}
        self._scratch: dict[str, str] = {}

    def add(self, path: str | os.PathLike, name: str) -> None:
        self._exact[str(path)] = name

    def add_scratch(self, folder: str | os.PathLike, name: str) -> None:
        self._scratch[str(folder)] = name

    def __call__(self, text: str) -> str:
        for path in sorted(self._exact, key=len, reverse=True):
            text = text.replace(path, self._exact[path])
        for folder in sorted(self._scratch, key=len, reverse=True):
            text = re.sub(re.escape(folder) + self._TAIL, self._scratch_name(folder), text)
        return text

    def _scratch_name(self, folder: str):
        name = self._scratch[folder]

        def replace(match: re.Match) -> str:
            path = match.group(0).rstrip("/")
            return name if path == folder else f"{path.rsplit('/', 1)[-1]} ({name})"
        return replace


def _plain(value: Any, names: UserPaths | None = None) -> Any:
    """JSON-safe copy: numpy scalars to Python numbers, NaN/inf to null, tuples to lists; texts
    through ``names``."""
    if isinstance(value, dict):
        return {str(k): _plain(v, names) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, names) for v in value]
    if hasattr(value, "item") and callable(value.item) and getattr(value, "shape", None) == ():
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, str):
        return value if names is None else names(value)
    if isinstance(value, (int, float, bool)) or value is None:
        return value
    return _plain(str(value), names)


def build(*, recipe, input_stats, output_stats, steps, benchmark, accuracy, gates, warnings,
          exit_code, reason, seconds, profiles=None, normalization=None,
          names: UserPaths | None = None) -> dict[str, Any]:
    """report.json's document; with ``names``, every text names what the user knows."""
    return _plain({
        "version": deployopt.__version__,
        "machine": _machine(),
        "recipe": recipe.raw,
        "input": input_stats,
        "output": output_stats,
        "normalization": normalization or [],
        "steps": steps,
        "benchmark": benchmark,
        "accuracy": accuracy,
        "gates": gates,
        "profile": {k: v["summary"] for k, v in (profiles or {}).items()},
        "warnings": warnings,
        "exit_code": exit_code,
        "reason": reason,
        "seconds": round(seconds, 1),
    }, names)


@dataclasses.dataclass
class Report:
    """report.json as an object: one attribute per top-level key, ``to_dict()`` gives the JSON."""

    version: str
    machine: dict[str, Any]
    recipe: dict[str, Any]
    input: dict[str, Any]
    output: dict[str, Any]
    steps: list[dict[str, Any]]
    benchmark: list[dict[str, Any]]
    accuracy: dict[str, Any]
    gates: list[dict[str, Any]]
    profile: dict[str, Any]
    warnings: list[str]
    exit_code: int
    reason: str | None
    seconds: float
    #: rewrites made to the input model on load, [{action, count, what, why}]
    normalization: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    out_dir: pathlib.Path | None = dataclasses.field(default=None, compare=False)

    @property
    def passed(self) -> bool:
        """Every gate met and every pass within its own tolerance."""
        return self.exit_code == 0

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "out_dir"}

    @classmethod
    def from_dict(cls, doc: dict[str, Any], out_dir: pathlib.Path | None = None) -> Report:
        names = [f.name for f in dataclasses.fields(cls) if f.name != "out_dir"]
        return cls(**{name: doc.get(name) for name in names}, out_dir=out_dir)

    @classmethod
    def read(cls, path: str | pathlib.Path) -> Report:
        """Load a report.json written by a run (its folder becomes ``out_dir``)."""
        path = pathlib.Path(path)
        return cls.from_dict(json.loads(path.read_text(encoding="utf-8")), out_dir=path.parent)


# -- formatting ------------------------------------------------------------------------------------

def _fmt(value: Any, spec: str = ".3g", none: str = "–") -> str:
    if value is None:
        return none
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def comparison_rows(doc: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """One row per model (input, output): size, MACs, p50, speedup, top-1, agreement."""
    header = ["model", "size MB", "zipped MB", "params", "MACs (M)", "p50 ms", "speedup", "top-1",
              "agreement"]
    rows = []
    bench = {(r["model"]): r for r in doc.get("benchmark", [])
             if r.get("threads") == (doc["benchmark"][0]["threads"] if doc.get("benchmark") else None)
             and r.get("batch") == doc["benchmark"][0].get("batch")}
    accuracy = doc.get("accuracy") or {}
    fidelity = accuracy.get("fidelity")
    if fidelity:  # agreement on the (larger) fidelity set says more than on the labelled one
        header[-1] = f"agreement (n={fidelity.get('n')})"
    for label in ("input", "output"):
        s = doc[label]
        b = bench.get(label, {})
        acc = accuracy.get(label) or {}
        # the input agrees with itself; the output's agreement is measured against the input
        agreement = 1.0 if label == "input" and accuracy else (fidelity or acc).get("agreement")
        macs = s.get("macs")
        rows.append([label, f"{s['bytes'] / 1e6:.2f}", f"{s['bytes_zip'] / 1e6:.2f}", f"{s['params']:,}",
                     _fmt(None if macs is None else macs / 1e6, ".1f"), _fmt(b.get("p50_ms"), ".2f"),
                     _fmt(b.get("speedup"), ".2f") + ("x" if b.get("speedup") else ""),
                     _fmt(acc.get("top1"), ".3f"), _fmt(agreement, ".3f")])
    return header, rows


def terminal_table(doc: dict[str, Any]) -> str:
    header, rows = comparison_rows(doc)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    out = [line(header), line(["-" * w for w in widths])] + [line(r) for r in rows]
    if doc.get("benchmark"):
        b = doc["benchmark"][0]
        out.append(f"(latency: {b['threads']} thread(s), batch {b['batch']}; "
                   f"machine: {doc['machine'].get('cpu', '?')})")
    floor = ((doc.get("accuracy") or {}).get("fidelity") or {}).get("noise_floor") or {}
    if floor.get("agreement") is not None:  # what the agreement column can be held to
        stable = (f"; the output agrees with the input on {floor['agreement_on_stable']:.3f} of the "
                  f"{floor['stable']} samples that noise leaves unchanged" if floor.get("agreement_on_stable") is not None
                  else "")
        out.append(f"(agreement noise floor: the input agrees with itself on {floor['agreement']:.3f} of the same "
                   f"samples moved by {floor['levels']} grey level{stable})")
    return "\n".join(out)


def markdown(doc: dict[str, Any], profile_markdown: dict[str, str] | None = None) -> str:
    m = doc["machine"]
    parts = ["# deployopt report\n",
             f"Result: **{'PASSED' if doc['exit_code'] == 0 else 'FAILED'}**"
             + (f" — {doc['reason']}" if doc.get("reason") else ""),
             f"\nMachine: {m.get('cpu')} · ISA {', '.join(m.get('isa', [])) or 'none'} · "
             f"{m.get('cores')} cores · onnxruntime {m.get('onnxruntime')} · {m.get('os')}",
             f"Total time: {doc['seconds']} s\n", "## Input vs output\n"]
    header, rows = comparison_rows(doc)
    parts.append(_table(header, rows))

    if doc.get("normalization"):
        parts.append("\n## Normalisation of the input model (before the passes)\n")
        parts.extend(f"- {a['what']} ({a['why']})" for a in doc["normalization"])

    if doc.get("steps"):
        parts.append("\n## Steps\n")
        step_rows = []
        for s in doc["steps"]:
            step_rows.append([s["pass"], s["status"], f"{s['seconds']:.1f}", "yes" if s["modified"] else "no",
                              f"{s['before']['bytes'] / 1e6:.2f} → {s['after']['bytes'] / 1e6:.2f}",
                              f"{s['before']['bytes_zip'] / 1e6:.2f} → {s['after']['bytes_zip'] / 1e6:.2f}",
                              f"{sum(s['before']['ops'].values())} → {sum(s['after']['ops'].values())}",
                              _macs_change(s), _fmt((s.get("accuracy") or {}).get("top1"), ".3f"),
                              _fmt((s.get("accuracy") or {}).get("agreement"), ".3f"),
                              _task_score(s.get("accuracy") or {})])
        parts.append(_table(["pass", "status", "seconds", "modified", "MB", "zipped MB", "nodes", "MACs (M)",
                             "top-1 after", "agreement after", "task score after (drop)"], step_rows))
        parts.append("\n(on the evaluation data after each step: top-1, agreement with the input model, and "
                     "the task metric with the largest drop against the input model)")
        for s in doc["steps"]:
            if s["notes"]:
                parts.append(f"\n**{s['pass']}**\n")
                parts.extend(f"- {n}" for n in s["notes"])

    if doc.get("benchmark"):
        b0 = doc["benchmark"][0]
        on = f"{b0['runtime']} {b0.get('runtime_version') or ''} {b0.get('ep')}" if b0.get("runtime") else "onnxruntime CPU"
        parts.append(f"\n## Latency ({' '.join(on.split())}, interleaved rounds)\n")
        bench_rows = [[r["model"], str(r["threads"]), str(r["batch"]), _fmt(r.get("p50_ms"), ".2f"),
                       _fmt(r.get("p90_ms"), ".2f"), _fmt(r.get("p99_ms"), ".2f"), _fmt(r.get("mean_ms"), ".2f"),
                       _fmt(r.get("std_ms"), ".2f"), _fmt(r.get("throughput_ips"), ".1f"),
                       _fmt(r.get("speedup"), ".2f") + _ci(r.get("speedup_ci"))]
                      for r in doc["benchmark"]]
        parts.append(_table(["model", "threads", "batch", "p50 ms", "p90 ms", "p99 ms", "mean ms", "std ms",
                             "images/s", "speedup (95% CI)"], bench_rows))

    if profile_markdown:
        parts.append("\n## Where the time goes (onnxruntime profiler, 10 most expensive nodes)\n")
        for label in ("input", "output"):
            if label in profile_markdown:
                parts.append(profile_markdown[label] + "\n")

    acc = doc.get("accuracy") or {}
    if "input" in acc:  # data.evaluation
        parts.append(f"\n## Accuracy on `{acc.get('dataset')}`\n")
        rows = []
        for label in ("input", "output"):
            a = acc[label]
            rows.append([label, _fmt(a.get("top1"), ".4f"), _fmt(a.get("top5"), ".4f"),
                         _fmt(a.get("agreement"), ".4f"), _fmt(a.get("cosine"), ".5f"), str(a.get("n"))])
        parts.append(_table(["model", "top-1", "top-5", "agreement", "cosine", "n"], rows))
        parts.extend(_judged_lines(acc))
    elif acc:  # data.fidelity alone
        parts.append("\n## Fidelity\n")
    if acc:
        fid = acc.get("fidelity")
        if fid:
            parts.append(f"\nFidelity of the output to the input on `{fid['dataset']}` (n={fid.get('n')}): "
                         f"top-1 agreement {_fmt(fid.get('agreement'), '.4f')} "
                         f"(95% CI {_ci(fid.get('agreement_ci')).strip() or '–'}), "
                         f"mean cosine {_fmt(fid.get('cosine'), '.5f')}, KL {_fmt(fid.get('kl'), '.2e')}, "
                         f"max |diff| {_fmt(fid.get('max_abs_diff'), '.3g')}")
            if fid.get("noise_floor"):
                from deployopt.measure.accuracy import noise_floor_text

                parts.append("\n" + noise_floor_text(fid["noise_floor"]))

    if doc.get("gates"):
        parts.append("\n## Gates\n")
        parts.append(_table(["gate", "limit", "value", "passed"],
                            [[g["name"], _fmt(g["limit"], "g"), _fmt(g["value"], ".4g", "not measured"),
                              "yes" if g["passed"] else "**no**"] for g in doc["gates"]]))
    if doc.get("warnings"):
        parts.append("\n## Warnings\n")
        parts.extend(f"- {w}" for w in doc["warnings"])
    return "\n".join(parts) + "\n"


def _task_score(accuracy: dict[str, Any]) -> str:
    """``pixel_agreement 0.9931 (0.0069)``: a step's task score and its drop."""
    if accuracy.get("score") is None:
        return "–"
    return f"{accuracy['score_name']} {accuracy['score']:.4f} ({_fmt(accuracy.get('drop'), '.4f')})"


def _judged_lines(acc: dict[str, Any]) -> list[str]:
    """The metric the gate reads, its score before and after and the drop; every metric's when
    there are several."""
    lines = [f"\nJudged by **{acc.get('metric')}**: input {_fmt(acc.get('score_in'), '.4f')} → output "
             f"{_fmt(acc.get('score_out'), '.4f')}, drop {_fmt(acc.get('drop'), '.4f')} (the largest drop of the "
             "task metrics; a metric compared with the input model scores 1 on the input)"]
    per_metric = acc.get("metrics") or []
    if len(per_metric) > 1:
        lines.append("")
        lines.append(_table(["outputs", "kind", "metric", "input", "output", "drop"],
                            [[", ".join(m["outputs"]), m["kind"], str(m["metric"]), _fmt(m.get("base"), ".4f"),
                              _fmt(m.get("score"), ".4f"), _fmt(m.get("drop"), ".4f")] for m in per_metric]))
    return lines


def _ci(ci: Any) -> str:
    if not ci or ci[0] is None:
        return ""
    return f" [{ci[0]:.2f}, {ci[1]:.2f}]"


def _macs_change(step: dict[str, Any]) -> str:
    a, b = step["before"].get("macs"), step["after"].get("macs")
    if a is None or b is None:
        return "–"
    return f"{a / 1e6:.1f} → {b / 1e6:.1f}"


def write(doc: dict[str, Any], out_dir: pathlib.Path, profile_markdown: dict[str, str] | None = None) -> None:
    """report.json then report.md, each written atomically."""
    io.atomic_write_text(out_dir / "report.json", json.dumps(doc, indent=2) + "\n")
    io.atomic_write_text(out_dir / "report.md", markdown(doc, profile_markdown))
