"""params.yaml, loaded into frozen dataclasses and validated before any work starts.

Each field states its default and its rule once, as `param(default, rule)`; the rules and
the one generic section reader live in `critical_weights.config.rules`, the strict YAML reader
in `critical_weights.config.strict_yaml`. Every problem is collected and reported at once, each naming the key, the bad
value and what is allowed. Unknown keys (typos included) are problems too, with the likely key
suggested. Rules that join two sections are the cross-checks at the end of this module.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from critical_weights.config.rules import (Boolean, Choice, ChoiceOrIndex, Choices, Fractions, Integer, Integers, Number, Positive,
                                          Problems, String, Structures, param, read_section)
from critical_weights.config.strict_yaml import read_yaml
from critical_weights.core.errors import ParamsError
from critical_weights.metrics import METRICS

RANK_MODES = ("per_tensor", "per_block", "per_component", "global")
RANK_MODE_ALIASES = (("per_layer", "per_tensor"),)  # the name before per_tensor, still accepted
DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")
DEVICE_MAPS = ("none", "auto")
PARALLEL = ("none", "fsdp")
PARAMETER_SETS = ("weights", "all")
HEATMAP_STATS = ("max", "mean")
PERTURBATIONS = ("zero", "sign_flip", "gauss_noise", "bit_flip")
CONTROLS = ("random_k", "bottom_k")
BIT_NAMES = ("sign", "exponent_msb")
DETECT_ON = ("prompt", "prepared")
PRUNE_GROUPS = ("per_row", "per_tensor")
SCORE_DTYPES = ("none", "bfloat16", "float16")


@dataclass(frozen=True)
class TextsParams:
    source: str = param("data/texts/corpus.jsonl", String())  # .jsonl/.txt/.parquet file, or a folder of .txt
    n_texts: int = param(100, Integer(minimum=1))  # texts drawn with `seed`; fewer available -> all, with a warning
    max_length: int = param(256, Integer(minimum=2))  # tokens per sequence, after the tokenizer's own special tokens


@dataclass(frozen=True)
class ModelParams:
    name: str = param("smollm2-135m", String())  # hub id, local HF directory, .gguf file, or smollm2-135m
    dtype: str = param("auto", Choice(DTYPES))  # auto = bfloat16 on CUDA, float32 on CPU
    device: str = param("auto", Choice(DEVICES))  # auto = cuda when available, else cpu
    device_map: str = param("none", Choice(DEVICE_MAPS))  # auto = spread blocks over every visible GPU (accelerate)
    parallel: str = param("none", Choice(PARALLEL))  # fsdp = shard the model and its gradient sums over processes (FSDP2)
    processes: int = param(0, Integer(minimum=0))  # fsdp outside torchrun: the stage launches this many (0 = one per visible GPU)
    trust_remote_code: bool = param(False, Boolean())  # never run a model's own code unless asked
    allow_pickle: bool = param(False, Boolean())  # refuse .bin/.pt pickle checkpoints unless asked


@dataclass(frozen=True)
class SensitivityParams:
    metrics: tuple[str, ...] = param(("grad_x_weight", "magnitude", "wanda"), Choices(METRICS))  # computed in one run
    parameters: str = param("weights", Choice(PARAMETER_SETS))  # weights = every weight tensor of ndim >= 2 (experts too); all = also norms and biases
    micro_batch_size: int = param(8, Integer(minimum=1))  # sequences per forward+backward
    batch_tokens: int = param(256, Integer(minimum=0))  # token budget per micro-batch (padded), 0 = no budget
    keep: int = param(1000, Integer(minimum=1))  # top candidates kept per parameter and metric; rank.k must be <= keep
    dense: bool = param(False, Boolean())  # also write every score (small models and tests only)
    hutchinson_probes: int = param(8, Integer(minimum=1))  # Rademacher probes for the `hutchinson` metric
    checkpointing: bool = param(True, Boolean())  # recompute each block's forward in backward: less memory, one more forward of the blocks
    save_sums: bool = param(True, Boolean())  # keep the float32 sums (dL/dW, ...) whole, 4 bytes per weight each: compress needs them


@dataclass(frozen=True)
class RankParams:
    metric: str = param("grad_x_weight", Choice(METRICS))  # which computed metric to rank by
    mode: str = param("per_tensor", Choice(RANK_MODES, RANK_MODE_ALIASES))  # per_tensor (alias per_layer) | per_block | per_component | global
    k: int = param(100, Integer(minimum=1))  # critical weights per group (per_tensor: per tensor)
    include: tuple[str, ...] = param((), Choices())  # glob patterns over parameter names; empty = all
    exclude: tuple[str, ...] = param((), Choices())  # glob patterns over parameter names to leave out


@dataclass(frozen=True)
class PlotParams:
    dpi: int = param(120, Integer(minimum=30, maximum=600))  # resolution of the PNG plots
    heatmap_stat: str = param("max", Choice(HEATMAP_STATS))  # block x component cell: max or mean score
    # the tensor whose pooled grid the heatmap shows: top (highest max score) or a parameter name
    heatmap_tensor: str = param("top", String())


@dataclass(frozen=True)
class ValidateParams:
    # bit_flip: sign | exponent_msb | an integer bit index (read first, so its problem is listed first)
    bit: str | int = param("exponent_msb", ChoiceOrIndex(BIT_NAMES, 32, "a bit index"))
    perturbations: tuple[str, ...] = param(("zero",), Choices(PERTURBATIONS))  # applied to the critical weights
    controls: tuple[str, ...] = param(("random_k", "bottom_k"), Choices(CONTROLS))  # same count, other weights
    k_values: tuple[int, ...] = param((1, 10, 100), Integers(minimum=1))  # damage curve over the global ranking
    random_draws: int = param(3, Integer(minimum=1))  # independent random_k draws per critical set: mean and spread
    exported: bool = param(True, Boolean())  # also perturb the exported set (rank.mode, rank.k)
    # weights zeroed one at a time for the metric-predictiveness table; 0 = none
    single_weights: int = param(8, Integer(minimum=0))
    noise_sigma: float = param(1.0, Number(0.0, 1e6))  # gauss_noise: sigma as a multiple of |w|
    n_texts: int = param(16, Integer(minimum=0))  # prepared (in-sample) texts measured, drawn with `seed`; 0 = all
    # held-out texts (source texts prepare did not choose), as a share of n_texts; 0 = in-sample only
    holdout: float = param(1.0, Number(0.0, 1.0))


@dataclass(frozen=True)
class SuperweightsParams:
    prompt: str = param("Apple Inc. is a worldwide tech company.", String())  # the Super Weight paper's detection prompt
    detect_on: str = param("prompt", Choice(DETECT_ON))  # prompt, or prepared: the n_texts measured texts, one pass each
    # a spike is |activation| > threshold, at both the input and the output of an MLP output projection
    threshold: float = param(50.0, Positive("the Super Weight paper uses 50"))
    max_candidates: int = param(8, Integer(minimum=1, maximum=1000))  # zero each candidate and search again, at most this often
    massive_top: int = param(3, Integer(minimum=1, maximum=100))  # largest hidden-state magnitudes reported per layer
    top_k: int = param(100, Integer(minimum=1))  # global top-k by rank.metric checked against the spike channels
    n_texts: int = param(16, Integer(minimum=0))  # prepared texts every loss is measured on, drawn as validate draws them; 0 = all


@dataclass(frozen=True)
class CompressParams:
    sparsities: tuple[float, ...] = param((0.1, 0.3, 0.5, 0.7), Fractions("sparsity"))  # unstructured: shares pruned
    structures: tuple[str, ...] = param(("unstructured", "2:4", "4:8"), Structures())  # unstructured and/or N:M
    groups: tuple[str, ...] = param(("per_row",), Choices(PRUNE_GROUPS))  # unstructured: compared per output row (Wanda) or per tensor
    include: tuple[str, ...] = param((), Choices())  # glob patterns over parameter names; empty = every weight inside the blocks
    n_texts: int = param(16, Integer(minimum=1))  # held-out texts every compress and quantize perplexity is measured on
    mask_sparsity: float = param(0.5, Number(0.0, 0.99))  # masks.safetensors: rank.metric, unstructured per row; 0 = none
    imatrix: bool = param(True, Boolean())  # imatrix.gguf: llama.cpp's importance matrix from wanda's sums of x²
    imatrix_fisher: bool = param(False, Boolean())  # imatrix_fisher.gguf: the same format, Fisher's column sums (needs fisher)
    scores: str = param("none", Choice(SCORE_DTYPES))  # scores.safetensors: rank.metric's scores of the pruned tensors; none = no file
    in_sample_texts: int = param(8, Integer(minimum=0))  # prepared texts measured beside the held-out ones, drawn as validate draws them; 0 = none
    stream: str = param("none", String())  # a text source joined into one token stream and measured in windows (the papers' WikiText-2 protocol); none = held-out texts
    context: int = param(2048, Integer(minimum=2))  # stream: tokens per window; stride = context (non-overlapping windows)
    max_windows: int = param(0, Integer(minimum=0))  # stream: measure the first this many windows; 0 = every full window
    drop_experts: tuple[int, ...] = param((1,), Integers(minimum=1, empty="none"))  # MoE: experts dropped per layer, least and most important by rank.metric, and at random
    expert_draws: int = param(3, Integer(minimum=1))  # MoE: random drops per count, for a mean and a spread


@dataclass(frozen=True)
class QuantizeParams:
    bits: tuple[int, ...] = param((3,), Integers(minimum=2, maximum=8))  # round-to-nearest widths, each measured
    group_size: int = param(128, Integer(minimum=1))  # inputs per group along each row; a smaller last group where it does not divide
    symmetric: bool = param(False, Boolean())  # false: asymmetric min-max (a zero point per group); true: max |w|
    keep: tuple[float, ...] = param((0.0001, 0.001, 0.01), Fractions("share of the quantised weights kept"))  # global top shares kept at their original values
    channels: float = param(0.01, Number(0.0, 0.5))  # AWQ: the top share of each tensor's input channels kept; 0 = none


@dataclass(frozen=True)
class DomainsParams:
    field: str = param("domain", String())  # the field that groups the texts (.jsonl key, .parquet column; for a folder, the subfolder); none = no grouped run
    source: str = param("data/texts/domains.jsonl", String())  # the labelled texts the groups are drawn from
    n_in_sample: int = param(8, Integer(minimum=1))  # texts per group whose gradient is taken, drawn with `seed`
    n_heldout: int = param(8, Integer(minimum=1))  # texts per group held out, measured in the damage matrix
    top_n: int = param(100, Integer(minimum=1))  # each group's critical set: its global top-N by rank.metric; <= sensitivity.keep
    per_tensor_k: int = param(100, Integer(minimum=1))  # and its top-k of each tensor by rank.metric; <= sensitivity.keep
    random_draws: int = param(2, Integer(minimum=1))  # random controls of N weights spread as the groups' sets are, for a spread


@dataclass(frozen=True)
class Params:
    seed: int = param(42, Integer(minimum=0, maximum=2**32 - 1))  # every random choice flows from here
    texts: TextsParams = TextsParams()
    model: ModelParams = ModelParams()
    sensitivity: SensitivityParams = SensitivityParams()
    rank: RankParams = RankParams()
    plot: PlotParams = PlotParams()
    validate: ValidateParams = ValidateParams()
    superweights: SuperweightsParams = SuperweightsParams()
    compress: CompressParams = CompressParams()
    quantize: QuantizeParams = QuantizeParams()
    domains: DomainsParams = DomainsParams()


SECTIONS = tuple(f.name for f in dataclasses.fields(Params))


def parse_params(raw: Any) -> Params:
    """Build Params from the parsed YAML, or raise ParamsError naming every problem."""
    problems = Problems()
    params = read_section(Params, raw, "", problems)
    problems.extend(_cross_checks(params, problems))
    if problems:
        raise ParamsError(problems)
    return params


def _cross_checks(p: Params, found: Problems) -> list[str]:
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
    for key in ("top_n", "per_tensor_k"):
        value = getattr(p.domains, key)
        if found.fine(f"domains.{key}", "sensitivity.keep") and value > p.sensitivity.keep:
            problems.append(f"domains.{key}: {value} exceeds sensitivity.keep {p.sensitivity.keep}; each group's sets are "
                            f"exact only up to keep (raise sensitivity.keep or lower domains.{key})")
    if found.fine("model.device_map", "model.device") and p.model.device_map == "auto" and p.model.device == "cpu":
        problems.append("model.device_map: 'auto' spreads over GPUs and needs model.device auto or cuda, not 'cpu'")
    if found.fine("model.parallel") and p.model.parallel == "fsdp":
        problems.extend(_fsdp_checks(p, found))
    return problems


def _fsdp_checks(p: Params, found: Problems) -> list[str]:
    """What `model.parallel: fsdp` cannot be combined with (docs/scale.md says why)."""
    problems = []
    if found.fine("model.device_map") and p.model.device_map != "none":
        problems.append("model.parallel: fsdp shards the model over torchrun's processes; "
                        "model.device_map auto spreads it over one process's GPUs: choose one (set model.device_map none)")
    if found.fine("model.processes") and p.model.processes == 1:
        problems.append("model.processes: 1 process cannot shard the model; allowed: 0 (one per visible GPU) or 2 and more")
    if found.fine("sensitivity.metrics") and "hutchinson" in p.sensitivity.metrics:
        problems.append("sensitivity.metrics: hutchinson cannot run with model.parallel fsdp (its Hessian-vector "
                        "products need double backward, which FSDP2 does not run); leave it out, or run it with "
                        "model.parallel none (one process, torchrun data parallel or model.device_map auto)")
    if found.fine("sensitivity.dense") and p.sensitivity.dense:
        problems.append("sensitivity.dense: every score is written by one process, which a sharded model does not "
                        "fit; set it false with model.parallel fsdp")
    return problems


def load_params(path: Path) -> Params:
    """Read and validate params.yaml: UTF-8 YAML whose top level maps section names to values."""
    raw = read_yaml(path)
    if raw is None:
        raise ParamsError([f"{path}: is empty; expected a mapping of the sections {', '.join(SECTIONS)}"])
    return parse_params(raw)
