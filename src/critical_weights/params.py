"""params.yaml, loaded into frozen dataclasses and validated before any work starts.

Every problem is collected and reported at once, each naming the key, the bad value and
what is allowed. Unknown keys (typos included) are problems too, with the likely key
suggested.
"""

from __future__ import annotations

import difflib
import reprlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from critical_weights.errors import ParamsError, first_line

METRICS = ("grad_x_weight", "gradient", "magnitude", "fisher", "taylor2", "hutchinson", "wanda")
RANK_MODES = ("per_layer", "per_block", "per_component", "global")
DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")
DEVICE_MAPS = ("none", "auto")
PARAMETER_SETS = ("matrices", "all")
HEATMAP_STATS = ("max", "mean")
PERTURBATIONS = ("zero", "sign_flip", "gauss_noise", "bit_flip")
CONTROLS = ("random_k", "bottom_k")


@dataclass(frozen=True)
class TextsParams:
    source: str = "data/texts/corpus.jsonl"  # .jsonl/.txt/.parquet file, or a folder of .txt
    n_texts: int = 100  # texts drawn with `seed`; fewer available -> all, with a warning
    max_length: int = 256  # tokens per sequence, after the tokenizer's own special tokens


@dataclass(frozen=True)
class ModelParams:
    name: str = "smollm2-135m"  # hub id, local HF directory, .gguf file, or smollm2-135m
    dtype: str = "auto"  # auto = bfloat16 on CUDA, float32 on CPU
    device: str = "auto"  # auto = cuda when available, else cpu
    device_map: str = "none"  # auto = spread blocks over every visible GPU (accelerate)
    trust_remote_code: bool = False  # never run a model's own code unless asked
    allow_pickle: bool = False  # refuse .bin/.pt pickle checkpoints unless asked


@dataclass(frozen=True)
class SensitivityParams:
    metrics: tuple[str, ...] = ("grad_x_weight", "magnitude")  # computed in one run
    parameters: str = "matrices"  # matrices = every 2-D weight; all = also norms and biases
    micro_batch_size: int = 8  # sequences per forward+backward
    batch_tokens: int = 0  # token budget per micro-batch (padded), 0 = no budget
    keep: int = 1000  # top candidates kept per parameter and metric; rank.k must be <= keep
    dense: bool = False  # also write every score (small models and tests only)
    hutchinson_probes: int = 8  # Rademacher probes for the `hutchinson` metric


@dataclass(frozen=True)
class RankParams:
    metric: str = "grad_x_weight"  # which computed metric to rank by
    mode: str = "per_layer"  # per_layer | per_block | per_component | global
    k: int = 100  # critical weights per group (per_layer: per tensor)
    include: tuple[str, ...] = ()  # glob patterns over parameter names; empty = all
    exclude: tuple[str, ...] = ()  # glob patterns over parameter names to leave out


@dataclass(frozen=True)
class PlotParams:
    dpi: int = 120  # resolution of the PNG plots
    heatmap_stat: str = "max"  # block x component cell: max or mean score


@dataclass(frozen=True)
class ValidateParams:
    perturbations: tuple[str, ...] = ("zero", "bit_flip")  # applied to the critical weights
    controls: tuple[str, ...] = ("random_k", "bottom_k")  # same count, other weights
    k_values: tuple[int, ...] = (1, 10, 100)  # damage curve over the global ranking
    noise_sigma: float = 1.0  # gauss_noise: sigma as a multiple of |w|
    bit: str | int = "exponent_msb"  # bit_flip: sign | exponent_msb | an integer bit index
    n_texts: int = 16  # prepared texts measured, drawn with `seed`; 0 = all of them
    holdout: float = 0.0  # held-out texts (source texts prepare did not choose), as a share of n_texts; 0 = none


@dataclass(frozen=True)
class Params:
    seed: int = 42  # every random choice flows from here
    texts: TextsParams = TextsParams()
    model: ModelParams = ModelParams()
    sensitivity: SensitivityParams = SensitivityParams()
    rank: RankParams = RankParams()
    plot: PlotParams = PlotParams()
    validate: ValidateParams = ValidateParams()


_REPR = reprlib.Repr()  # bounded: a huge or aliased (billion laughs) value prints short
_REPR.maxlevel, _REPR.maxdict, _REPR.maxlist, _REPR.maxtuple, _REPR.maxset = 3, 4, 6, 6, 6
_REPR.maxstring, _REPR.maxlong, _REPR.maxother = 60, 40, 60
SECTIONS = ("seed", "texts", "model", "sensitivity", "rank", "plot", "validate")


def _show(value: Any) -> str:
    """A value as it appears in a message: repr, one line, bounded however large or nested."""
    return _REPR.repr(value)


def _name(key: Any) -> str:
    """A key as it appears in a message: itself when printable and short, else its repr."""
    return key if isinstance(key, str) and key.isprintable() and 0 < len(key) <= 60 else _show(key)


class _Problems(list):
    """Problem messages, and the dotted keys (or whole sections) whose value was refused."""

    def __init__(self) -> None:
        super().__init__()
        self.bad: set[str] = set()

    def fine(self, *keys: str) -> bool:
        """None of `keys`, nor the section holding it, was refused: cross-checks may use them."""
        return not any(k in self.bad or k.split(".")[0] in self.bad for k in keys)


class _Section:
    """Reads one mapping of params.yaml, recording problems instead of raising."""

    def __init__(self, raw: Any, prefix: str, problems: list[str]):
        self.prefix, self.problems = prefix, problems
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            getattr(problems, "bad", set()).add(prefix)
            if prefix:
                problems.append(f"{prefix}: {_show(raw)} is not a mapping")
            else:
                problems.append(f"top level: {_show(raw)} is not a mapping; expected the sections {', '.join(SECTIONS)}")
            raw = {}
        self.raw, self.seen = raw, set()

    def _key(self, key: str) -> str:
        return f"{self.prefix}.{key}" if self.prefix else key

    def _fail(self, key: str, message: str) -> None:
        """Record that `key` was refused, and why (message follows "section.key: ")."""
        self.problems.append(f"{self._key(key)}: {message}")
        getattr(self.problems, "bad", set()).add(self._key(key))

    def get(self, key: str, default: Any) -> tuple[Any, bool]:
        self.seen.add(key)
        return (self.raw[key], True) if key in self.raw else (default, False)

    def integer(self, key: str, default: int, minimum: int | None = None, maximum: int | None = None) -> int:
        value, given = self.get(key, default)
        if not given:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            self._fail(key, f"{_show(value)} is not an integer")
            return default
        if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
            bounds = f">= {minimum}" if maximum is None else f"between {minimum} and {maximum}"
            self._fail(key, f"{_show(value)} must be an integer {bounds}")
            return default
        return value

    def number(self, key: str, default: float, minimum: float, maximum: float) -> float:
        value, given = self.get(key, default)
        if not given:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not minimum <= value <= maximum:
            self._fail(key, f"{_show(value)} must be a number between {minimum} and {maximum}")
            return default
        return float(value)

    def boolean(self, key: str, default: bool) -> bool:
        value, given = self.get(key, default)
        if given and not isinstance(value, bool):
            self._fail(key, f"{_show(value)} must be true or false")
            return default
        return value

    def string(self, key: str, default: str) -> str:
        value, given = self.get(key, default)
        if given and (not isinstance(value, str) or not value.strip()):
            self._fail(key, f"{_show(value)} must be a non-empty string")
            return default
        return value

    def choice(self, key: str, default: str, allowed: tuple[str, ...]) -> str:
        value, given = self.get(key, default)
        if given and value not in allowed:
            self._fail(key, f"{_show(value)} is not one of {', '.join(allowed)}")
            return default
        return value

    def choices(self, key: str, default: tuple[str, ...], allowed: tuple[str, ...] | None) -> tuple[str, ...]:
        """A list of strings; with `allowed`, each must be one of them, and none repeated."""
        value, given = self.get(key, default)
        if not given:
            return default
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            self._fail(key, f"{_show(value)} must be a list of strings")
            return default
        bad = [v for v in value if allowed is not None and v not in allowed]
        if bad:
            self._fail(key, f"{', '.join(map(_show, bad))} not one of {', '.join(allowed)}")
            return default
        if allowed is not None and not value:
            self._fail(key, f"[] must name at least one of {', '.join(allowed)}")
            return default
        if len(set(value)) != len(value):
            self._fail(key, f"{_show(value)} repeats an entry")
            return default
        return tuple(value)

    def integers(self, key: str, default: tuple[int, ...], minimum: int) -> tuple[int, ...]:
        value, given = self.get(key, default)
        if not given:
            return default
        ok = isinstance(value, list) and value and all(
            isinstance(v, int) and not isinstance(v, bool) and v >= minimum for v in value
        )
        if not ok:
            self._fail(key, f"{_show(value)} must be a non-empty list of integers >= {minimum}")
            return default
        return tuple(sorted(set(value)))

    def finish(self) -> None:
        """Report keys this section does not know, suggesting the nearest known one."""
        for key in self.raw:
            if key in self.seen:
                continue
            name = self._key(_name(key))
            close = difflib.get_close_matches(str(key)[:100], sorted(self.seen), n=1)
            hint = f" (did you mean {self._key(close[0])}?)" if close else ""
            allowed = ", ".join(sorted(self.seen))
            self.problems.append(f"{name}: unknown key{hint}; known keys here are {allowed}")


def _texts(raw: Any, problems: list[str]) -> TextsParams:
    s, d = _Section(raw, "texts", problems), TextsParams()
    out = TextsParams(
        source=s.string("source", d.source),
        n_texts=s.integer("n_texts", d.n_texts, minimum=1),
        max_length=s.integer("max_length", d.max_length, minimum=2),
    )
    s.finish()
    return out


def _model(raw: Any, problems: list[str]) -> ModelParams:
    s, d = _Section(raw, "model", problems), ModelParams()
    out = ModelParams(
        name=s.string("name", d.name),
        dtype=s.choice("dtype", d.dtype, DTYPES),
        device=s.choice("device", d.device, DEVICES),
        device_map=s.choice("device_map", d.device_map, DEVICE_MAPS),
        trust_remote_code=s.boolean("trust_remote_code", d.trust_remote_code),
        allow_pickle=s.boolean("allow_pickle", d.allow_pickle),
    )
    s.finish()
    return out


def _sensitivity(raw: Any, problems: list[str]) -> SensitivityParams:
    s, d = _Section(raw, "sensitivity", problems), SensitivityParams()
    out = SensitivityParams(
        metrics=s.choices("metrics", d.metrics, METRICS),
        parameters=s.choice("parameters", d.parameters, PARAMETER_SETS),
        micro_batch_size=s.integer("micro_batch_size", d.micro_batch_size, minimum=1),
        batch_tokens=s.integer("batch_tokens", d.batch_tokens, minimum=0),
        keep=s.integer("keep", d.keep, minimum=1),
        dense=s.boolean("dense", d.dense),
        hutchinson_probes=s.integer("hutchinson_probes", d.hutchinson_probes, minimum=1),
    )
    s.finish()
    return out


def _rank(raw: Any, problems: list[str]) -> RankParams:
    s, d = _Section(raw, "rank", problems), RankParams()
    out = RankParams(
        metric=s.choice("metric", d.metric, METRICS),
        mode=s.choice("mode", d.mode, RANK_MODES),
        k=s.integer("k", d.k, minimum=1),
        include=s.choices("include", d.include, None),
        exclude=s.choices("exclude", d.exclude, None),
    )
    s.finish()
    return out


def _plot(raw: Any, problems: list[str]) -> PlotParams:
    s, d = _Section(raw, "plot", problems), PlotParams()
    out = PlotParams(
        dpi=s.integer("dpi", d.dpi, minimum=30, maximum=600),
        heatmap_stat=s.choice("heatmap_stat", d.heatmap_stat, HEATMAP_STATS),
    )
    s.finish()
    return out


def _validate(raw: Any, problems: list[str]) -> ValidateParams:
    s, d = _Section(raw, "validate", problems), ValidateParams()
    bit, given = s.get("bit", d.bit)
    if given and not (bit in ("sign", "exponent_msb") or (isinstance(bit, int) and not isinstance(bit, bool) and 0 <= bit < 32)):
        problems.append(f"validate.bit: {_show(bit)} is not one of sign, exponent_msb, or a bit index 0..31")
        bit = d.bit
    out = ValidateParams(
        perturbations=s.choices("perturbations", d.perturbations, PERTURBATIONS),
        controls=s.choices("controls", d.controls, CONTROLS),
        k_values=s.integers("k_values", d.k_values, minimum=1),
        noise_sigma=s.number("noise_sigma", d.noise_sigma, minimum=0.0, maximum=1e6),
        bit=bit,
        n_texts=s.integer("n_texts", d.n_texts, minimum=0),
        holdout=s.number("holdout", d.holdout, minimum=0.0, maximum=1.0),
    )
    s.finish()
    return out


def parse_params(raw: Any) -> Params:
    """Build Params from the parsed YAML, or raise ParamsError naming every problem."""
    problems = _Problems()
    top = _Section(raw, "", problems)
    params = Params(
        seed=top.integer("seed", Params.seed, minimum=0, maximum=2**32 - 1),
        texts=_texts(top.get("texts", None)[0], problems),
        model=_model(top.get("model", None)[0], problems),
        sensitivity=_sensitivity(top.get("sensitivity", None)[0], problems),
        rank=_rank(top.get("rank", None)[0], problems),
        plot=_plot(top.get("plot", None)[0], problems),
        validate=_validate(top.get("validate", None)[0], problems),
    )
    top.finish()
    problems.extend(_cross_checks(params, problems))
    if problems:
        raise ParamsError(problems)
    return params


def _cross_checks(p: Params, found: _Problems) -> list[str]:
    """Rules that join two sections, checked only between values that were not refused
    (a refused value stands in as its default, which the user never wrote)."""
    problems = []
    if found.fine("rank.metric", "sensitivity.metrics") and p.rank.metric not in p.sensitivity.metrics:
        problems.append(
            f"rank.metric: {p.rank.metric!r} is not computed; sensitivity.metrics has "
            f"{', '.join(p.sensitivity.metrics)}"
        )
    if found.fine("rank.k", "sensitivity.keep") and p.rank.k > p.sensitivity.keep:
        problems.append(
            f"rank.k: {p.rank.k} exceeds sensitivity.keep {p.sensitivity.keep}; "
            "raise sensitivity.keep so the ranking stays exact"
        )
    if found.fine("validate.k_values", "sensitivity.keep") and max(p.validate.k_values) > p.sensitivity.keep:
        problems.append(
            f"validate.k_values: {max(p.validate.k_values)} exceeds sensitivity.keep {p.sensitivity.keep}"
        )
    if found.fine("model.device_map", "model.device") and p.model.device_map == "auto" and p.model.device == "cpu":
        problems.append("model.device_map: 'auto' spreads over GPUs and needs model.device auto or cuda, not 'cpu'")
    return problems


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping, instead of keeping the last."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key; the base class reports it
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {_name(key)} appears twice in one mapping", key_node.start_mark)
        return super().construct_mapping(node, deep)


def _yaml_problem(err: yaml.YAMLError) -> str:
    """One line: what is wrong and where."""
    if isinstance(err, yaml.MarkedYAMLError) and err.problem_mark is not None:
        mark = err.problem_mark
        return f"{err.problem or err.context} at line {mark.line + 1}, column {mark.column + 1}"
    return first_line(err)


def load_params(path: Path) -> Params:
    """Read and validate params.yaml: UTF-8 YAML whose top level maps section names to values."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ParamsError([f"{path}: cannot be read ({err.strerror})"]) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ParamsError([f"{path}: is not UTF-8 text (bad byte at offset {err.start})"]) from None
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        raise ParamsError([f"{path}: is not valid YAML ({_yaml_problem(err)})"]) from None
    except RecursionError:
        raise ParamsError([f"{path}: is nested too deeply to be params"]) from None
    if raw is None:
        raise ParamsError([f"{path}: is empty; expected a mapping of the sections {', '.join(SECTIONS)}"])
    return parse_params(raw)
