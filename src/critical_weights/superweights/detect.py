"""Super weights and massive activations, found from forward passes alone.

Detection follows the Super Weight paper (Yu et al., 2024). One forward pass on a prompt records,
for every block's MLP output projection (per expert for MoE), the largest |input| and |output|
activation and their channels. Where both exceed `superweights.threshold`, the weight at
(row = output channel, col = input channel) is a candidate: the input spike times that weight
makes the output spike. The candidate is zeroed and the search runs again (a later spike may be
the echo of an earlier one) until none is left or `superweights.max_candidates` are found; each
round takes the earliest block that spikes on both sides.

Massive activations (Sun et al., 2024) are the largest hidden-state magnitudes of each layer, as
`output_hidden_states` returns them (0 = the embeddings, last = after the final norm).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from critical_weights.config.params import SuperweightsParams
from critical_weights.core.errors import TextsError
from critical_weights.model.projections import Projection, watch
from critical_weights.validation.perturbation import digest, flat_view, zeroed
from critical_weights.validation.selection import from_pairs

log = logging.getLogger(__name__)


@dataclass
class Spike:
    """The largest |activation| seen on one side of a projection."""

    value: float = 0.0  # signed
    channel: int = -1
    text: int | None = None  # which sequence (0 for the prompt)
    position: int | None = None  # token position; None for experts, whose rows are routed tokens

    def offer(self, a: torch.Tensor, text: int, positions: bool) -> None:
        """Keep the largest |a| of a (n, channels) activation if it beats the current one."""
        flat = a.detach().float().reshape(-1)  # (n * channels,) float32
        i = int(flat.abs().argmax())
        if abs(float(flat[i])) > abs(self.value):
            pos, ch = divmod(i, a.shape[-1])
            self.value, self.channel, self.text, self.position = float(flat[i]), ch, text, pos if positions else None


@dataclass
class ProjectionRecord:
    """Max |input| and |output| of one projection (one expert of it, for MoE)."""

    projection: Projection
    expert: int | None
    inp: Spike = field(default_factory=Spike)
    out: Spike = field(default_factory=Spike)

    def spikes(self, threshold: float) -> bool:
        return abs(self.inp.value) > threshold and abs(self.out.value) > threshold


@dataclass(frozen=True)
class Candidate:
    """A super-weight candidate: the weight joining an input spike to an output spike."""

    round: int  # search round that found it (0 = the unmodified model)
    projection: Projection
    expert: int | None
    row: int  # output channel of the spike
    col: int  # input channel of the spike
    flat_index: int
    weight: float
    inp: Spike
    out: Spike

    @property
    def key(self) -> tuple[str, int]:
        return self.projection.parameter, self.flat_index


def record(model: torch.nn.Module, projections: list[Projection], sequences: Sequence[Sequence[int]]
           ) -> tuple[list[ProjectionRecord], list[torch.Tensor]]:
    """One forward pass per sequence: the max |input| and |output| of every projection (and
    expert), and every layer's hidden states (T, C) per sequence, float32 on the CPU."""
    records: dict[tuple[int, int | None], ProjectionRecord] = {}
    order = {id(p): i for i, p in enumerate(projections)}
    text = 0

    def fn(proj: Projection, expert: int | None, x: torch.Tensor, y: torch.Tensor) -> None:
        key = (order[id(proj)], expert)
        rec = records.setdefault(key, ProjectionRecord(proj, expert))
        rec.inp.offer(x, text, expert is None)  # x (n, in)
        rec.out.offer(y, text, expert is None)  # y (n, out)

    hidden: list[list[torch.Tensor]] = []  # per sequence, per layer (T, C)
    device = model.get_input_embeddings().weight.device
    with watch(model, projections, fn), torch.no_grad():
        for text, seq in enumerate(sequences):
            ids = torch.tensor([list(seq)], dtype=torch.long, device=device)  # (1, T)
            out = model(input_ids=ids, output_hidden_states=True, use_cache=False)
            hidden.append([h[0].float().cpu() for h in out.hidden_states])
    ordered = [records[k] for k in sorted(records, key=lambda k: (k[0], -1 if k[1] is None else k[1]))]
    return ordered, _layers(hidden)


def _layers(hidden: list[list[torch.Tensor]]) -> list[list[torch.Tensor]]:
    """Per layer, the (T, C) hidden states of every sequence."""
    return [[seqs[layer] for seqs in hidden] for layer in range(len(hidden[0]))]


def search(model: torch.nn.Module, projections: list[Projection], sequences: Sequence[Sequence[int]],
           sp: SuperweightsParams) -> tuple[list[Candidate], list[ProjectionRecord], list[list[torch.Tensor]]]:
    """The iterative search. Returns the candidates, the unmodified model's projection records
    and its hidden states per layer."""
    weights = dict(model.named_parameters())
    found: list[Candidate] = []
    first: list[ProjectionRecord] = []
    hidden: list[list[torch.Tensor]] = []
    before = {n: digest(w) for n, w in weights.items() if n in {p.parameter for p in projections}}
    for rnd in range(sp.max_candidates):
        with zeroed(weights, from_pairs([c.key for c in found]), before):
            records, layers = record(model, projections, sequences)
        if rnd == 0:
            first, hidden = records, layers
        taken = {c.key for c in found}
        hits = [r for r in records if r.spikes(sp.threshold)
                and (r.projection.parameter, r.projection.flat_index(r.expert, r.out.channel, r.inp.channel)) not in taken]
        if not hits:
            log.info("round %d: no new spike above %g on both sides; %d candidate(s)", rnd, sp.threshold, len(found))
            break
        r = hits[0]  # the earliest block: a later spike may be this one's echo
        flat = r.projection.flat_index(r.expert, r.out.channel, r.inp.channel)
        w = float(flat_view(weights[r.projection.parameter])[flat])
        found.append(Candidate(rnd, r.projection, r.expert, r.out.channel, r.inp.channel, flat, w, r.inp, r.out))
        log.info("round %d: candidate %s expert %s (row %d, col %d), w = %.4g, |in| %.4g, |out| %.4g", rnd,
                 r.projection.parameter, r.expert, r.out.channel, r.inp.channel, w, abs(r.inp.value), abs(r.out.value))
    else:
        log.info("stopped after superweights.max_candidates = %d rounds; more spikes may remain", sp.max_candidates)
    return found, first, hidden


def massive_activations(layers: list[list[torch.Tensor]], top: int) -> list[dict[str, Any]]:
    """Per layer: the `top` largest |h| (value, channel, text, position) and the median |h|."""
    out = []
    for layer, seqs in enumerate(layers):
        entries = []
        for text, h in enumerate(seqs):  # h (T, C) float32
            a = h.abs().reshape(-1)
            vals, idx = torch.topk(a, min(top, a.numel()))
            for v, i in zip(vals.tolist(), idx.tolist()):
                pos, ch = divmod(i, h.shape[-1])
                entries.append((v, text, pos, ch, float(h[pos, ch])))
        entries.sort(key=lambda e: (-e[0], e[1], e[2], e[3]))
        median = float(torch.cat([h.abs().reshape(-1) for h in seqs]).median())
        out.append({"layer": layer, "median_abs": median,
                    "top": [{"value": e[4], "abs": e[0], "channel": e[3], "text": e[1], "position": e[2],
                             "ratio_to_median": e[0] / median if median > 0 else None} for e in entries[:top]]})
    return out



def prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    """The prompt tokenised as `prepare` tokenises texts; at least 2 tokens."""
    ids = list(tokenizer(prompt)["input_ids"])
    if len(ids) < 2:
        raise TextsError(f"superweights.prompt: {prompt!r} is {len(ids)} token(s) with this model's tokenizer; "
                         "it needs at least 2")
    return ids
