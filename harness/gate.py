"""The CI gate: a run directory and thresholds in, an exit code, a one-screen summary and JUnit XML out.

The decision itself is `reports.verdicts.evaluate`, the same function the report's verdict banner
uses, so CI and the reviewer's page cannot disagree. This module adds what only CI needs: reading
thresholds from a config file, refusing partial runs, the exit code and the JUnit file.
"""

from __future__ import annotations

import tomllib
import xml.etree.ElementTree as ET
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from harness.errors import UserError
from reports.fmt import fmt_pct
from reports.run import Run, load_run, primary_judge, prompt_sets, set_rate
from reports.verdicts import Thresholds, Verdict, evaluate

EXIT_PASS, EXIT_FAIL, EXIT_BAD_INPUT = 0, 1, 2


def load_thresholds(config: str | None, overrides: dict[str, Any]) -> Thresholds:
    """Defaults, then the config file's ``[gate]`` table, then command-line overrides (not None)."""
    values: dict[str, Any] = {}
    if config:
        path = Path(config)
        if not path.is_file():
            raise UserError(f"config file {config!r} not found: pass an existing TOML file to --config")
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise UserError(f"config file {config!r} is not valid TOML ({' '.join(str(exc).split())}): fix the syntax") from None
        table = data.get("gate")
        if not isinstance(table, dict):
            raise UserError(f"config file {config!r} has no [gate] table: add one with the thresholds "
                            "(see docs/ci-gate.md)")
        values.update(table)
    thresholds = Thresholds.from_mapping(values, where=f"config file {config!r} [gate]" if config else "thresholds")
    extra = tuple(overrides.pop("checks", None) or ())
    known = {f.name for f in fields(Thresholds)}
    thresholds = replace(thresholds, **{k: v for k, v in overrides.items() if k in known and v is not None})
    if extra:
        thresholds = replace(thresholds, checks=thresholds.checks + extra)
    thresholds.bounds()  # validate now: contradictions are bad input, before any result is read
    return thresholds


def check_complete(run: Run) -> None:
    """A gate on a partial run would pass variants it never saw: refuse it (exit 2)."""
    where = str(run.run_dir)
    if not run.variants:
        raise UserError(f"run {where!r} has no finished variant: let the audit finish (re-run it to resume)")
    unfinished = [str(v["name"]) for v in run.variants if str(v.get("status") or "done") != "done"]
    planned = (run.summary.get("config") or {}).get("variants")
    if isinstance(planned, list) and len(run.variants) < len(planned):
        unfinished.append(f"{len(planned) - len(run.variants)} of {len(planned)} configured variants missing")
    if unfinished:
        raise UserError(f"run {where!r} is partial ({'; '.join(unfinished)}): re-run the same audit to finish it, "
                        "then gate")
    if not any(s.role == "harmful" for s in prompt_sets(run)):
        raise UserError(f"run {where!r} has no harmful prompt set: audit with one (e.g. --prompt-sets harmful benign "
                        "overrefusal) so safety can be gated")


@dataclass
class GateResult:
    run: Run
    thresholds: Thresholds
    verdicts: list[Verdict]

    @property
    def gated(self) -> list[Verdict]:
        return [v for v in self.verdicts if v.status in ("pass", "fail")]

    @property
    def exit_code(self) -> int:
        return EXIT_FAIL if any(v.status == "fail" for v in self.verdicts) else EXIT_PASS


def gate(run_dir: Path | str, thresholds: Thresholds | None = None, variants: list[str] | None = None) -> GateResult:
    """Evaluate a finished run directory; UserError/ReportError (exit 2) for bad input."""
    run = load_run(Path(run_dir))
    check_complete(run)
    names = [str(v["name"]) for v in run.variants]
    unknown = [n for n in variants or [] if n not in names]
    if unknown:
        raise UserError(f"--variant {unknown[0]!r} is not in run {str(run_dir)!r}: its variants are {', '.join(names)}")
    wanted = None if not variants else [names[0], *variants]
    return GateResult(run, thresholds or Thresholds(), evaluate(run, thresholds, wanted))


def text_summary(result: GateResult) -> str:
    """One screen: the run, the thresholds, a line per variant with the reason, the decision."""
    run, t = result.run, result.thresholds
    subject = ((run.summary.get("models") or {}).get("subject") or {})
    subject = subject.get("name") if isinstance(subject, dict) else subject
    sets = prompt_sets(run)
    ref = run.reference
    # Per harmful set: pooling sets of different difficulty into one percentage hides which one moved.
    harmful = ", ".join(f"{s.name} {fmt_pct(set_rate(ref, s.name))}" for s in sets if s.role == "harmful") if ref else ""
    lines = [f"safequant gate: {run.run_dir} ({subject or 'unknown model'}, reference {ref['name'] if ref else '—'} "
             f"refuses harmful prompts: {harmful or '—'}; judge {primary_judge(run) or '—'})",
             "thresholds: " + " · ".join(t.describe())]
    width = max((len(v.variant) for v in result.verdicts), default=4)
    for v in result.verdicts:
        if v.status == "reference":
            continue
        lines.append(f"  {v.status.upper():<10} {v.variant:<{width}}  {v.reason}")
        lines.extend(f"  {'':<10} {'':<{width}}  warning: {c.reason}" for c in v.checks if c.status == "warn" and v.failed)
    failed = [v.variant for v in result.gated if v.status == "fail"]
    lines.append(f"GATE FAILED: {len(failed)} of {len(result.gated)} variants fail ({', '.join(failed)})" if failed
                 else f"GATE PASSED: {len(result.gated)} of {len(result.gated)} variants pass")
    return "\n".join(lines)


def junit_xml(result: GateResult) -> str:
    """JUnit XML: one test case per (variant, check), so CI lists each threshold as a test."""
    checks = [c for v in result.gated for c in v.checks]
    suite = ET.Element("testsuite", {
        "name": "safequant.gate", "tests": str(len(checks)),
        "failures": str(sum(c.status == "fail" for c in checks)),
        "skipped": str(sum(c.status == "skip" for c in checks)), "errors": "0",
    })
    props = ET.SubElement(suite, "properties")
    ET.SubElement(props, "property", {"name": "run_dir", "value": str(result.run.run_dir)})
    for i, phrase in enumerate(result.thresholds.describe()):
        ET.SubElement(props, "property", {"name": f"threshold.{i}", "value": phrase})
    for c in checks:
        case = ET.SubElement(suite, "testcase", {"classname": f"safequant.gate.{c.variant}", "name": str(c.bound)})
        if c.status == "fail":
            ET.SubElement(case, "failure", {"message": c.reason, "type": "threshold"}).text = c.reason
        elif c.status == "skip":
            ET.SubElement(case, "skipped", {"message": c.reason})
        else:
            ET.SubElement(case, "system-out").text = c.reason
    root = ET.Element("testsuites")
    root.append(suite)
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"
