"""Weight names between moekit and a Hugging Face family: one table of rules drives both directions.

A `Rule` says where a Hugging Face tensor lives inside a moekit tensor: the moekit state-dict key
(a template over the layer index `{i}`), the Hugging Face name (over `{i}` and, for per-expert
tensors, the expert `{e}`), which part of the moekit tensor it fills (a row chunk, one expert's
slice) and how the layout differs (transposed, rows permuted). `expand` turns the table into one
`Entry` per Hugging Face tensor for a concrete model, so an importer copies each streamed tensor
into its place, and an exporter cuts each moekit tensor into the Hugging Face ones.

Shape suffixes: E experts, F expert hidden width, D d_model.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Permute:
    """Rows (or the entries along `dim`) in another order: hf[..., j, ...] = moekit[..., order[j], ...].

    `order(n)` gives the order for a dim of size n."""

    order: Callable[[int], Tensor]
    dim: int = 0

    def to_hf(self, x: Tensor) -> Tensor:
        return x.index_select(self.dim, self.order(x.shape[self.dim]).to(x.device))

    def from_hf(self, x: Tensor) -> Tensor:
        return x.index_select(self.dim, torch.argsort(self.order(x.shape[self.dim])).to(x.device))


@dataclass(frozen=True)
class Transpose:
    """The last two dims swapped (GPT-OSS stores expert weights as (in, out))."""

    def to_hf(self, x: Tensor) -> Tensor:
        return x.transpose(-1, -2)

    def from_hf(self, x: Tensor) -> Tensor:
        return x.transpose(-1, -2)


def interleave_halves(n: int) -> Tensor:
    """[g0, u0, g1, u1, ...] from [g0, g1, ... | u0, u1, ...]: GPT-OSS's gate/up layout."""
    half = n // 2
    return torch.stack((torch.arange(half), torch.arange(half, n)), dim=1).reshape(-1)


def interleave_rope(block: int, rope_start: int, rope_dim: int) -> Callable[[int], Tensor]:
    """Within every `block` rows, DeepSeek's interleaved rotary pairs (x0, x1), (x2, x3), ... at rows
    rope_start.. from moekit's GPT-NeoX halves (x0, x2, ... | x1, x3, ...)."""

    def order(n: int) -> Tensor:
        index = torch.arange(n).view(-1, block).clone()
        rope = index[:, rope_start:rope_start + rope_dim]
        half = rope_dim // 2
        pairs = torch.stack((rope[:, :half], rope[:, half:]), dim=-1).reshape(rope.shape)
        index[:, rope_start:rope_start + rope_dim] = pairs
        return index.reshape(-1)

    return order


@dataclass(frozen=True)
class Rule:
    """One moekit tensor (or a part of it) <-> one Hugging Face tensor per layer (and per expert)."""

    moekit: str
    """State-dict key template, e.g. 'blocks.{i}.attn.kv_proj.weight'."""
    hf: str
    """Hugging Face name template, e.g. 'model.layers.{i}.self_attn.k_proj.weight'; with '{e}', one
    tensor per expert, each the expert's slice [e] of the moekit tensor."""
    chunk: tuple[int, int] | None = None
    """(k, n): the k-th of n equal row chunks (of the expert's slice): [gate | up], [k | v]."""
    layout: tuple = ()
    """Transforms from moekit's layout to the Hugging Face one, applied in order (`Permute`, `Transpose`)."""

    @property
    def per_expert(self) -> bool:
        return "{e}" in self.hf


@dataclass(frozen=True)
class Entry:
    """A rule made concrete: Hugging Face tensor `hf` is `region` of moekit tensor `key`."""

    hf: str
    key: str
    rule: Rule
    expert: int | None

    def region(self, tensor: Tensor) -> Tensor:
        """The view of the moekit tensor this entry fills (writable)."""
        if self.expert is not None:
            tensor = tensor[self.expert]
        if self.rule.chunk is not None:
            k, n = self.rule.chunk
            tensor = tensor.chunk(n, dim=0)[k]
        return tensor

    def to_hf(self, tensor: Tensor) -> Tensor:
        x = self.region(tensor)
        for step in self.rule.layout:
            x = step.to_hf(x)
        return x.contiguous()

    def from_hf(self, x: Tensor) -> Tensor:
        for step in reversed(self.rule.layout):
            x = step.from_hf(x)
        return x


def _template_regex(template: str) -> re.Pattern:
    return re.compile(re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)") + "$")


def expand(state_keys: Iterable[str], rules: list[Rule], num_experts: int, family: str) -> list[Entry]:
    """One `Entry` per Hugging Face tensor for a model with these state-dict keys. Every key must
    be covered by a rule; a key no rule covers means the family cannot express the model."""
    compiled = [(rule, _template_regex(rule.moekit)) for rule in rules]
    entries: list[Entry] = []
    for key in state_keys:
        matched = False
        for rule, pattern in compiled:
            m = pattern.match(key)
            if m is None:
                continue
            matched = True
            fields = m.groupdict()
            if rule.per_expert:
                entries += [Entry(rule.hf.format(e=e, **fields), key, rule, e) for e in range(num_experts)]
            else:
                entries.append(Entry(rule.hf.format(**fields), key, rule, None))
        if not matched:
            raise ValueError(f"moekit tensor {key} has no place in a {family} checkpoint")
    return entries
