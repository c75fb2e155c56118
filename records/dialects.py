"""One tolerant reader for every run-log dialect of the challenge (ours and the official records').

The official logs of openai/parameter-golf `records/track_10min_16mb/` changed format many times:
`step:N/M val_loss:X ... train_time:Tms` (the March baseline script and its descendants),
`N/M val_loss: X val_bpb: Y` (the April SP8192 stack), final lines from
`final_int8_zlib_roundtrip_exact` to `quantized_ttt_phased`, torchrun warning preambles, and some
logs carry the whole script before the first run line. Every line is matched against one table of
patterns (LINE_PATTERNS); a line that matches none is ignored. Patterns are anchored at the start
of the line, so a script dumped into the log (indented f-strings) cannot masquerade as a result.

Our own format (docs/interfaces.md) is one dialect among them, read by logparse.parse_log.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

from . import rules, summary
from .logparse import parse_log

# Stage classes of a final evaluation: the score a submission stands on is the last evaluation of
# the highest class the log reports (TTT after sliding after round trip).
PRE_QUANT, ROUNDTRIP, SLIDING, TTT = 0, 1, 2, 3
# (label regex, class), first match wins; the label is the text before " val_loss:".
STAGE_TABLE = (
    (r"^(chunked|lora|phased|ngram_tilt|ngram_mix|ngram)$", TTT),  # our final_eval passes (logparse.py)
    (r"^flat$", ROUNDTRIP),
    (r"^doc$", SLIDING),
    (r"(?i)^(?!.*pre[_ -]?ttt).*ttt", TTT),
    (r"(?i).*sliding.*", SLIDING),
    (
        r"(?i)^(diagnostic )?(pre-quantization|post_ema|raw|ema|pre_quant)\b.*|^DIAGNOSTIC post_ema.*",
        PRE_QUANT,
    ),
    (r"(?i).*(roundtrip|quantized|post_quant|quant).*", ROUNDTRIP),
)
_STAGE_RES = tuple((re.compile(rx), cls) for rx, cls in STAGE_TABLE)

_NUM = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|nan|inf"


@dataclass
class Eval:
    label: str
    stage: int
    val_loss: float
    val_bpb: float
    eval_time_s: float | None
    line_no: int
    text: str


@dataclass
class Run:
    """What one run log states; None means the log does not say."""

    path: Path
    dialect: str = "unknown"
    seed: int | None = None
    world_size: int | None = None
    model_params: int | None = None
    val_tokens: int | None = None  # tokens scored: nats/token compare only on the same tokenization
    steps: int | None = None
    train_time_s: float | None = None
    train_time_source: str | None = None
    evals: list[Eval] = field(default_factory=list)
    calibration_s: float | None = None  # calibration after the training clock stopped
    calibration_line: str | None = None
    calibration_spans: list[float] = field(default_factory=list)
    calibration_total: float | None = None
    production_s: float | None = None  # training start to artifact, as the log states it
    total_eval_s: float | None = None
    bytes_model: int | None = None
    bytes_code: int | None = None
    bytes_total: int | None = None
    config: dict[str, str] = field(default_factory=dict)
    stops: int = 0
    features: set[str] = field(default_factory=set)
    # step-line points for plots: step, train_time_ms (the latest stated), train_loss or val_bpb
    curve: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    score_override: Eval | None = None  # our dialect: the final JSON's score, located on its line

    @property
    def name(self) -> str:
        return self.path.name

    def claim(self) -> Eval | None:
        """The score the run stands on: the last evaluation of the highest stage class reported."""
        if self.score_override is not None:
            return self.score_override
        finals = [e for e in self.evals if e.stage > PRE_QUANT and math.isfinite(e.val_loss)]
        if not finals:
            return None
        top = max(e.stage for e in finals)
        return [e for e in finals if e.stage == top][-1]

    def eval_seconds(self) -> tuple[float | None, str]:
        """(seconds, how it was obtained) for the evaluation of the artifact."""
        if self.total_eval_s is not None:
            return self.total_eval_s, "stated total_eval_time"
        times = [e.eval_time_s for e in self.evals if e.stage > PRE_QUANT and e.eval_time_s is not None]
        if not times:
            return None, "not stated"
        return sum(times), f"sum of {len(times)} stated eval times after quantization"

    def production_seconds(self) -> tuple[float | None, str]:
        """(seconds, how) from training start to artifact: the stated figure, else training clock plus
        the calibration the log reports after the clock stopped (a lower bound: packing and
        compression time are not stated)."""
        if self.production_s is not None:
            return self.production_s, "stated"
        if self.train_time_s is None:
            return None, "not stated"
        if self.calibration_s is None:
            return None, "not stated (no calibration time after training in the log)"
        return self.train_time_s + self.calibration_s, "training clock + calibration after it (lower bound)"


# ---- the line table -------------------------------------------------------------------------------


def _set_seed(run, m, no, line):
    run.seed = int(m["v"])


def _set_world(run, m, no, line):
    run.world_size = int(m["v"])


def _set_params(run, m, no, line):
    run.model_params = int(m["v"])


def _set_val_tokens(run, m, no, line):
    run.val_tokens = int(m["v"])


def _step(run, m, no, line):
    step = int(m["step"])
    if run.curve and step < run.curve[-1]["step"]:  # a second run in the same file starts over
        run.curve = []
    run.steps = step
    if m.groupdict().get("ms"):
        run.train_time_s, run.train_time_source = int(m["ms"]) / 1000.0, f"line {no}: step line"
    elif m.groupdict().get("min"):  # the April dialect prints minutes with one decimal
        run.train_time_s, run.train_time_source = float(m["min"]) * 60.0, f"line {no}: step line (0.1 min)"
    # val lines of the April dialect state no time: they take the latest one stated
    point = dict(step=step, train_time_ms=1000.0 * (run.train_time_s or 0.0))
    for key in ("train_loss", "val_bpb"):
        found = re.search(rf"\b{key}: ?({_NUM})", line)
        if found:
            point[key] = float(found[1])
    run.curve.append(point)


def _stop(run, m, no, line):
    run.stops += 1
    run.steps = int(m["step"])
    run.train_time_s, run.train_time_source = int(m["ms"]) / 1000.0, f"line {no}: stopping_early"
    # a second run in the same file starts over
    run.calibration_s, run.calibration_line, run.calibration_spans, run.calibration_total = (
        None,
        None,
        [],
        None,
    )


def _final(run, m, no, line):
    label = m["label"].strip()
    stage = next((cls for rx, cls in _STAGE_RES if rx.match(label)), None)
    if stage is None:
        return
    time_ms = re.search(r"eval_time:\s?(\d+)ms", m["rest"] or "")
    seconds = int(time_ms[1]) / 1000.0 if time_ms else None
    run.evals.append(Eval(label, stage, float(m["loss"]), float(m["bpb"]), seconds, no, line))


def _model_bytes(run, m, no, line):
    if m["fmt"].strip():  # "Serialized model: N bytes" without a format is the raw torch file
        run.bytes_model = int(m["n"])


def _code_bytes(run, m, no, line):
    if m["kind"] in (None, "compressed") or run.bytes_code is None:
        run.bytes_code = int(m["n"])


def _total_bytes(run, m, no, line):
    run.bytes_total = int(m["n"])


def _calibration(run, m, no, line):
    """A span of artifact work after the training clock stopped (GPTQ calibration, quantization,
    compression). Lines that state a whole ("gptq:done in", "serialize_wallclock") cover the spans
    before them, so the figure is max(whole, sum of spans), never a double count."""
    if run.train_time_s is None:
        return
    seconds = float(m["s"])
    if re.search(r"done in|serialize_wallclock", line):
        run.calibration_total = max(run.calibration_total or 0.0, seconds)
    else:
        run.calibration_spans.append(seconds)
    run.calibration_s = max(run.calibration_total or 0.0, sum(run.calibration_spans))
    run.calibration_line = f"line {no}: {line.strip()}"


def _production(run, m, no, line):
    run.production_s = float(m["s"])


def _total_eval(run, m, no, line):
    run.total_eval_s = float(m["s"])


def _hparam(run, m, no, line):
    run.config.setdefault(m["k"].upper(), m["v"].strip())


@dataclass(frozen=True)
class LinePattern:
    name: str
    regex: re.Pattern
    action: object
    feature: str | None = None  # what this line says about the dialect


def _p(name, rx, action, feature=None):
    return LinePattern(name, re.compile(rx), action, feature)


LINE_PATTERNS = (
    _p("torchrun_preamble", r"^(W\d{4} \d\d:\d\d:\d\d|\*{5,}$|Setting OMP_NUM_THREADS)", None, "torchrun"),
    _p(
        "step_v1",
        r"^step:(?P<step>\d+)/(?P<total>\d+) (?:val|train)_loss:\S+.*?train_time:(?P<ms>\d+)ms",
        _step,
        "step:N/M",
    ),
    _p(
        "step_v2",
        rf"^(?P<step>\d+)/(?P<total>\d+) (?:val|train)_loss: (?:{_NUM})(?:.*?train_time: (?P<min>[\d.]+)m)?",
        _step,
        "N/M",
    ),
    _p(
        "stopping_early",
        r"^stopping_early: wallclock_cap train_time: ?(?P<ms>\d+)ms step: ?(?P<step>\d+)/\d+",
        _stop,
    ),
    _p(
        "final_eval",
        rf"^(?P<label>[A-Za-z][A-Za-z0-9_ .-]*?)(?: stride:\d+)? "
        rf"val_loss: ?(?P<loss>{_NUM}) val_bpb: ?(?P<bpb>{_NUM})(?P<rest>.*)$",
        _final,
    ),
    _p("serialized_model", r"^Serialized model(?P<fmt>[^:]*): (?P<n>\d+) bytes", _model_bytes),
    _p("code_size", r"^Code size(?: \((?P<kind>[a-z]+)\))?: (?P<n>\d+) bytes", _code_bytes),
    _p("total_size", r"^Total submission size[^:]*: (?P<n>\d+) bytes", _total_bytes),
    _p("ternary_budget", r"^budget:(?P<n>\d+)/\d+", _total_bytes),
    _p("calibration", r"^(?:gptq|GPTQ)[: ].*?\bin (?P<s>\d+(?:\.\d+)?)s\b", _calibration, "gptq"),
    _p("serialize_wallclock", r"^serialize_wallclock: ?(?P<s>\d+(?:\.\d+)?)s", _calibration),
    _p(
        "production",
        r"^(?:wallclock:post_gptq total_elapsed:|artifact_production_wallclock: ?)(?P<s>[\d.]+)s",
        _production,
    ),
    _p("total_eval_time", r"^total_eval_time: ?(?P<s>[\d.]+)s", _total_eval),
    # Indented in Hyperparameters blocks (by two spaces, or more after a unix-time prefix); a number
    # right after the colon, so a script dumped into the log (`seed: int = ...`) cannot set them.
    _p("seed", r"^\s*seed: ?(?P<v>\d+)\s*$", _set_seed),
    _p("world_size", r"^\s*world_size: ?(?P<v>\d+)\b", _set_world),
    _p("model_params", r"^model_params: ?(?P<v>\d+)", _set_params),
    _p("val_tokens", r"^(?:val_tokens: ?|val_loader:shards .* tokens:)(?P<v>\d+)\s*$", _set_val_tokens),
    _p("hyperparameter", r"^  (?P<k>[a-z_][a-z0-9_]*): (?P<v>.*)$", _hparam, "Hyperparameters block"),
)


_TIMESTAMP = re.compile(r"^\d{9,11}\.\d+ ")


def dialect_name(features: set[str]) -> str:
    """A short name for the family of a log, from the kinds of lines it holds."""
    if "N/M" in features:
        name = "official-2026-04 (N/M val_loss: X, Hyperparameters block)"
    elif "step:N/M" in features:
        name = "official-2026-03 (step:N/M ... train_time:Tms)"
    else:
        name = "official (no step lines)"
    return name + (", unix-time prefixed" if "timestamped" in features else "")


def read_official_text(text: str, path: Path) -> Run:
    run = Run(path=path)
    for no, raw in enumerate(text.splitlines(), start=1):
        line = raw.rstrip()
        if _TIMESTAMP.match(line):  # the 04-13 record prefixes every line with a unix time
            line = _TIMESTAMP.sub("", line, count=1)
            run.features.add("timestamped")
        for pattern in LINE_PATTERNS:
            match = pattern.regex.match(line)
            if match is None:
                continue
            if pattern.feature:
                run.features.add(pattern.feature)
            if pattern.action is not None:
                pattern.action(run, match, no, line)
            break
    run.dialect = dialect_name(run.features)
    if run.stops > 1:
        run.notes.append(
            f"{run.stops} runs in one file (stopping_early lines); the figures are the last run's"
        )
    found = re.search(r"seed_?(\d+)", path.name) or re.search(r"_(\d+)$", path.stem)
    if run.seed is None and found:
        run.seed = int(found[1])
        run.notes.append(f"seed {run.seed} taken from the file name (the log does not state it)")
    elif found and "seed" in path.name and int(found[1]) != run.seed:
        run.notes.append(f"the file name says seed {found[1]} but the log states seed {run.seed}")
    return run


def read_ours(path: Path) -> Run:
    """Our own dialect, through logparse (the numbers come from the final JSON line)."""
    log = parse_log(path)
    final = log["final"] or {}
    run = Run(path=path, dialect="ours (run_id first line, key:value lines, final JSON)")
    run.seed = final.get("seed")
    run.world_size = log["header"].get("world_size")
    run.val_tokens = final.get("val_tokens")
    run.steps = final.get("steps")
    run.train_time_s = final.get("train_time_s")
    run.train_time_source = "final JSON train_time_s"
    run.production_s = final.get("artifact_production_wallclock_s")
    if run.production_s is None and run.train_time_s is not None and final.get("export_time_s") is not None:
        run.production_s = run.train_time_s + final["export_time_s"]
    run.total_eval_s = final.get("eval_time_s")
    run.bytes_model, run.bytes_code = final.get("bytes_model"), final.get("bytes_code")
    run.bytes_total = final.get("bytes_total")
    run.config = dict(log["hp"])
    for fe in log["final_evals"]:
        if not (isinstance(fe.get("val_loss"), float) and isinstance(fe.get("val_bpb"), float)):
            continue
        stage = next((cls for rx, cls in _STAGE_RES if rx.match(str(fe["stage"]))), ROUNDTRIP)
        run.evals.append(
            Eval(f"final_eval:{fe['stage']}", stage, fe.get("val_loss"), fe.get("val_bpb"), None, 0, "")
        )
    if isinstance(final.get("val_bpb"), float) and isinstance(final.get("val_loss"), float):
        line = _json_line_no(path)
        run.score_override = Eval(
            "final JSON val_bpb/val_loss", TTT, final["val_loss"], final["val_bpb"], None, line, ""
        )
    run.notes.extend(f"{p}" for p in log["errors"])
    if log["missing"]:
        run.notes.append("truncated or incomplete: missing " + ", ".join(log["missing"]))
    return run


def _json_line_no(path: Path) -> int:
    """Line number of the final JSON (the last line starting with "{")."""
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    return max((i for i, ln in enumerate(lines, start=1) if ln.startswith("{")), default=0)


def first_line(path: Path) -> str:
    """The first line that is not a torchrun warning or blank."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for raw in f:
            line = raw.strip()
            if line and not LINE_PATTERNS[0].regex.match(line):
                return line
    return ""


def read_run(path) -> Run:
    """Read one log in whatever dialect; OSError if it cannot be opened."""
    path = Path(path)
    if first_line(path).startswith("run_id:"):
        return read_ours(path)
    return read_official_text(path.read_text(encoding="utf-8", errors="replace"), path)


def is_run_log(path: Path) -> bool:
    """A *.log / *.txt that opens like our logs or holds a final evaluation or step line."""
    if path.suffix not in (".log", ".txt") or path.name.lower() in ("requirements.txt",):
        return False
    try:
        if first_line(path).startswith("run_id:"):
            return True
        run = read_official_text(path.read_text(encoding="utf-8", errors="replace"), path)
    except (OSError, UnicodeError):
        return False
    return bool(run.evals or run.steps is not None)


def find_run_files(folder) -> list[Path]:
    """Run logs of a record folder: its top level and a logs/ subfolder (as in the 04-10 record)."""
    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.is_file())
    if (folder / "logs").is_dir():
        files += sorted(p for p in (folder / "logs").iterdir() if p.is_file())
    return [p for p in files if is_run_log(p)]


# ---- submission.json -----------------------------------------------------------------------------


def load_submission(folder) -> tuple[dict | None, str | None]:
    """(submission dict, None) or (None, one-line reason). Any submission*.json is accepted."""
    folder = Path(folder)
    paths = [folder / "submission.json"] + sorted(folder.glob("submission_*.json"))
    path = next((p for p in paths if p.is_file()), None)
    if path is None:
        return None, "no submission.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as exc:
        return None, f"{path.name} does not parse ({exc})"
    if not isinstance(data, dict):
        return None, f"{path.name} is not a JSON object"
    return data, None


def number(value) -> float | None:
    """A JSON number as float (bools excluded), None for anything else."""
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def submission_seeds(sub: dict) -> dict[str, dict]:
    """{seed: {"val_loss", "val_bpb", ...}} under whatever key the submission uses: `seed_results`
    (dict), `seeds` as a dict of results, or `seeds` + `seed_scores` lists (val_bpb only)."""
    out: dict[str, dict] = {}
    for key in ("seed_results", "seeds"):
        table = sub.get(key)
        if isinstance(table, dict):
            for seed, entry in table.items():
                if isinstance(entry, dict):
                    out[str(seed)] = entry
            if out:
                return out
    seeds, scores = sub.get("seeds"), sub.get("seed_scores")
    if isinstance(seeds, list) and isinstance(scores, list) and len(seeds) == len(scores):
        return {str(s): {"val_bpb": v} for s, v in zip(seeds, scores, strict=True)}
    return out


def submission_score(sub: dict, key: str) -> float | None:
    """The headline mean: `val_bpb` / `val_loss`, or the `mean_*` spellings some records use."""
    for name in (key, f"mean_{key}", "mean_bpb" if key == "val_bpb" else "mean_val_loss_nats"):
        value = number(sub.get(name))
        if value is not None:
            return value
    return None


# ---- a folder's runs -----------------------------------------------------------------------------


def _agrees(entry: dict, claim: Eval) -> bool:
    bpb = number(entry.get("val_bpb"))
    return bpb is not None and abs(bpb - claim.val_bpb) <= 5e-5


def _references(runs: list[Run], sub: dict | None) -> dict[str, dict]:
    """submission.json's score per seed key; where every log states one seed and there are no
    per-seed results (several runs of seed 1337, say), the headline is that seed's score."""
    if not sub:
        return {}
    per_seed = submission_seeds(sub)
    keys = {_key(run) for run in runs}
    headline = submission_score(sub, "val_bpb")
    if not per_seed and len(keys) == 1 and headline is not None:
        return {keys.pop(): {"val_bpb": headline}}
    return per_seed


def _key(run: Run) -> str:
    return str(run.seed) if run.seed is not None else run.name


def folder_runs(folder) -> tuple[list[Run], list[str]]:
    """One run per seed from a record folder's logs (any dialect), plus notes. Where several logs
    state the same seed (a copy as train.log, an original and a rerun, repeated runs of one seed),
    the one whose score agrees with submission.json is used, else the first by name; the others are
    named in a note."""
    folder = Path(folder)
    notes, runs = [], []
    for path in find_run_files(folder):
        try:
            runs.append(read_run(path))
        except (OSError, UnicodeError, ValueError) as exc:
            notes.append(f"{path.name}: unreadable ({exc})")
    sub, _ = load_submission(folder)
    per_seed = _references(runs, sub)
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(_key(run), []).append(run)
    chosen = []
    for key, group in groups.items():
        agreeing = [
            r
            for r in group
            if r.claim() is not None and key in per_seed and _agrees(per_seed[key], r.claim())
        ]
        keep = (agreeing or group)[0]
        chosen.append(keep)
        others = [r.name for r in group if r is not keep]
        if others:
            why = "its score agrees with submission.json" if agreeing else "the first by name"
            notes.append(
                f"seed {key}: {', '.join(others)} also state(s) this seed; {keep.name} is used ({why})"
            )
    return chosen, notes


@dataclass(frozen=True)
class Disagreement:
    """A submission.json score against the logs. kind: `mismatch`; `rounding` (equal to within one
    unit of the last digit it states, e.g. a mean of per-seed values rounded first); `one_run` (the
    headline is one log's score, not the mean of all)."""

    kind: str
    message: str


def disagreements(runs: list[Run], sub: dict) -> list[Disagreement]:
    """Where submission.json's scores differ from the logs' final evaluations, to the digits printed
    (per seed under whatever key, then the headline mean)."""
    out = []
    per_seed = submission_seeds(sub)
    for run in runs:
        claim, entry = run.claim(), per_seed.get(str(run.seed))
        if claim is None or entry is None:
            continue
        for key in ("val_bpb", "val_loss"):
            printed, actual = _printed(entry.get(key)), getattr(claim, key)
            if printed is None or summary.matches(printed, actual):
                continue
            said = f"submission.json seed {run.seed} {key} is {printed} but {score_source(run)} says {actual}"
            out.append(_judged(said, printed, actual))
    claims = [(r, r.claim()) for r in runs if r.claim() is not None]
    for key in ("val_bpb", "val_loss"):
        printed = _printed(submission_score(sub, key))
        if printed is None or not claims:
            continue
        mean, _ = summary.mean_std(getattr(c, key) for _, c in claims)
        if summary.matches(printed, mean):
            continue
        said = (
            f"submission.json {key} is {printed} but the mean of the logs' final scores "
            f"({len(claims)} seed(s)) is {mean:.8f}"
        )
        same = [r.name for r, c in claims if summary.matches(printed, getattr(c, key))]
        if same and len(claims) > 1:
            out.append(Disagreement("one_run", f"{said} (it is {same[0]}'s score alone)"))
        else:
            out.append(_judged(said, printed, mean))
    return out


def _judged(said: str, printed: Decimal, actual: float) -> Disagreement:
    """A rounding note only for a value precise enough to check (a 1.2 is not 1.25 rounded twice)."""
    precise = summary.decimals(printed) >= rules.MIN_SCORE_DECIMALS
    if precise and summary.within_last_digit(printed, actual):
        return Disagreement("rounding", f"{said}: equal to within one unit of its last digit (rounding)")
    return Disagreement("mismatch", said)


def _printed(value) -> Decimal | None:
    """A JSON number as printed (digits kept), None for anything else."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return Decimal(repr(value))


def score_source(run: Run) -> str:
    """`file:line label` of the claimed score, for the reader to check by eye."""
    claim = run.claim()
    if claim is None:
        return f"{run.name}: no final evaluation"
    return f"{run.name}:{claim.line_no} {claim.label}" if claim.line_no else f"{run.name} {claim.label}"
