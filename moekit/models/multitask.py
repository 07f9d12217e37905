"""Multi-task recommenders: Shared-Bottom, OMoE, MMoE and PLE over tabular features.

- Shared-Bottom (Caruana 1997): one shared network, a tower per task.
- OMoE and MMoE: Ma et al., "Modeling Task Relationships in Multi-task Learning with Multi-gate
  Mixture-of-Experts", KDD 2018. A bank of experts; OMoE has one softmax gate shared by all tasks,
  MMoE one gate per task.
- PLE: Tang et al., "Progressive Layered Extraction (PLE): A Novel Multi-Task Learning (MTL) Model for
  Personalized Recommendations", RecSys 2020. Each CGC level has task-specific and shared experts; a
  task's gate mixes its own and the shared experts, a shared gate (all but the last level) mixes all.

Options from practice: input BatchNorm + dropout, residual experts, attention gates (a task query
attends over the expert outputs instead of a softmax over a linear map of the input), deeper towers.

The expert bank is fused: experts of a group are stacked weights (G, E, out, in) run as one batched
matmul per layer, never a Python loop over experts.

Shape suffixes: N rows, D input width, C categorical features, F numeric features, G expert groups
(input branches), E experts, H expert hidden width, O expert output width, T tasks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.config import documented
from moekit.models.pretrained import Pretrained

ARCHITECTURES = ("shared_bottom", "omoe", "mmoe", "ple")
TASK_TYPES = ("binary", "regression")
GATES = ("softmax", "attention")


# ---------------------------------------------------------------------------------------------- blocks


class TabularEmbedding(nn.Module):
    """Categorical indices and numeric values -> one flat input row (N, C * embed_dim + F).

    One table holds every feature's vocabulary at an offset, so all lookups are a single gather.
    """

    def __init__(self, vocab_sizes: tuple[int, ...], embed_dim: int, num_numeric: int) -> None:
        super().__init__()
        offsets_C = torch.tensor([0, *vocab_sizes], dtype=torch.long).cumsum(0)[:-1]
        self.register_buffer("offsets_C", offsets_C, persistent=False)
        self.table = nn.Embedding(max(sum(vocab_sizes), 1), embed_dim)
        nn.init.normal_(self.table.weight, std=0.05)
        self.num_numeric = num_numeric
        self.out_dim = len(vocab_sizes) * embed_dim + num_numeric

    def forward(self, cat_NC: Tensor, num_NF: Tensor) -> Tensor:
        if cat_NC.shape[1] != self.offsets_C.shape[0] or num_NF.shape[1] != self.num_numeric:
            raise ValueError(f"expected {self.offsets_C.shape[0]} categorical and {self.num_numeric} numeric "
                             f"features, got {cat_NC.shape[1]} and {num_NF.shape[1]}")
        # index_select rather than nn.Embedding: its backward is a scatter-add, ~5x faster on CPU than
        # embedding_dense_backward for these small tables.
        rows = (cat_NC + self.offsets_C).view(-1)
        emb_NX = self.table.weight.index_select(0, rows).view(cat_NC.shape[0], -1)
        return torch.cat([emb_NX, num_NF], dim=1)


def mlp(d_in: int, widths: tuple[int, ...], dropout: float = 0.0) -> nn.Sequential:
    """Linear -> ReLU (-> Dropout) per width: the bottom of Shared-Bottom and the hidden part of towers."""
    layers: list[nn.Module] = []
    for width in widths:
        layers += [nn.Linear(d_in, width), nn.ReLU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        d_in = width
    return nn.Sequential(*layers)


class ExpertBank(nn.Module):
    """G groups of E two-layer ReLU experts, fused: (G, N, D) -> (G, E, N, O).

    Group g's experts all read input branch g (PLE feeds each task's experts its own branch; MMoE has
    one group). Output is post-ReLU, like the experts of the MMoE paper. `residual` adds a skip path
    (identity when D == O, else one shared linear projection) so deep stacks keep a direct route.
    """

    def __init__(self, groups: int, experts: int, d_in: int, d_hidden: int, d_out: int,
                 residual: bool = False, dropout: float = 0.0, batchnorm: bool = False) -> None:
        super().__init__()
        self.groups, self.experts, self.d_out = groups, experts, d_out
        self.w1_GEHD = nn.Parameter(torch.empty(groups, experts, d_hidden, d_in))
        self.b1_GEH = nn.Parameter(torch.empty(groups, experts, d_hidden))
        self.w2_GEOH = nn.Parameter(torch.empty(groups, experts, d_out, d_hidden))
        self.b2_GEO = nn.Parameter(torch.empty(groups, experts, d_out))
        self.skip = None
        if residual:
            self.skip = nn.Identity() if d_in == d_out else nn.Linear(d_in, d_out, bias=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # Optional BatchNorm before each ReLU, per (expert, unit): one BatchNorm1d over a group's
        # contiguous (N, E * width) slab, so it costs no copy.
        norms = lambda width: nn.ModuleList(nn.BatchNorm1d(experts * width) for _ in range(groups))  # noqa: E731
        self.norm1 = norms(d_hidden) if batchnorm else None
        self.norm2 = norms(d_out) if batchnorm else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Linear's default, per expert: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
        for w, b in ((self.w1_GEHD, self.b1_GEH), (self.w2_GEOH, self.b2_GEO)):
            bound = 1 / math.sqrt(w.shape[-1])
            nn.init.uniform_(w, -bound, bound)
            nn.init.uniform_(b, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        """x: (G, N, D), one input branch per group, or (N, D) read by every group -> (G, E, N, O)."""
        if x.dim() == 2 and self.norm1 is None:
            return self.run_on_one_input([self], x)[0]
        G, E, H, O = self.groups, self.experts, self.w1_GEHD.shape[2], self.d_out
        N, D = x.shape[-2:]
        x_GND = x.expand(G, N, D) if x.dim() == 2 else x
        # First layer of all E experts as one (N, D) x (D, E*H) GEMM per group.
        w1_GDX = self.w1_GEHD.reshape(G, E * H, D).transpose(1, 2)
        h_GNX = torch.baddbmm(self.b1_GEH.view(G, 1, E * H), x_GND, w1_GDX)
        if self.norm1 is not None:
            h_GNX = torch.stack([norm(h_GNX[g]) for g, norm in enumerate(self.norm1)])
        # Expert-major layout for the second layer: one (N, H) x (H, O) matmul per expert in a bmm
        # is ~3x faster than einsum over the token-major layout (which permutes inside autograd twice).
        h_XNH = F.relu(h_GNX).view(G, N, E, H).transpose(1, 2).reshape(G * E, N, H)
        w2_XHO = self.w2_GEOH.reshape(G * E, O, H).transpose(1, 2)
        y_GENO = torch.baddbmm(self.b2_GEO.reshape(G * E, 1, O), h_XNH, w2_XHO).view(G, E, N, O)
        if self.norm2 is not None:
            y_GNX = y_GENO.permute(0, 2, 1, 3).reshape(G, N, E * O)
            y_GNX = torch.stack([norm(y_GNX[g]) for g, norm in enumerate(self.norm2)])
            y_GENO = y_GNX.view(G, N, E, O).permute(0, 2, 1, 3)
        return self._finish(F.relu(y_GENO), x)

    def _finish(self, y_GENO: Tensor, x: Tensor) -> Tensor:
        if self.skip is not None:
            skip = self.skip(x)
            y_GENO = y_GENO + (skip.unsqueeze(0) if skip.dim() == 2 else skip).unsqueeze(1)
        return self.dropout(y_GENO)

    @staticmethod
    def run_on_one_input(banks: list[ExpertBank], x_ND: Tensor) -> list[Tensor]:
        """Banks without BatchNorm that all read one input (N, D) (MMoE; PLE's first level, whose
        task-specific and shared banks see the same row) as one GEMM per layer over all their
        experts: the weights are concatenated (a few KB) -> [(G, E, N, O) per bank]."""
        if any(bank.norm1 is not None for bank in banks):
            raise ValueError("run_on_one_input needs banks without BatchNorm")
        N, D = x_ND.shape
        H, O = banks[0].w1_GEHD.shape[2], banks[0].d_out
        cat = lambda ts: ts[0] if len(ts) == 1 else torch.cat(ts)  # noqa: E731
        w1_XD = cat([bank.w1_GEHD.reshape(-1, D) for bank in banks])  # X = all experts' hidden units
        b1_X = cat([bank.b1_GEH.reshape(-1) for bank in banks])
        h_NX = torch.addmm(b1_X, x_ND, w1_XD.t())
        experts = h_NX.shape[1] // H
        h_ENH = F.relu(h_NX).view(N, experts, H).transpose(0, 1).reshape(experts, N, H)
        w2_EHO = cat([bank.w2_GEOH.reshape(-1, O, H) for bank in banks]).transpose(1, 2)
        b2_E1O = cat([bank.b2_GEO.reshape(-1, 1, O) for bank in banks])
        y_ENO = F.relu(torch.baddbmm(b2_E1O, h_ENH, w2_EHO))
        sizes = [bank.groups * bank.experts for bank in banks]
        parts = y_ENO.split(sizes) if len(banks) > 1 else [y_ENO]
        return [bank._finish(y.view(bank.groups, bank.experts, N, O), x_ND)
                for bank, y in zip(banks, parts, strict=True)]


class SoftmaxGate(nn.Module):
    """The MMoE gate: softmax(W x) over E experts, in float32 so weights sum to 1 under autocast."""

    def __init__(self, d_in: int, num_experts: int, d_expert: int) -> None:
        super().__init__()
        self.proj = nn.Linear(d_in, num_experts)

    def forward(self, x_ND: Tensor, experts_ENO: Tensor) -> Tensor:
        """-> (E, N) weights, expert-major (see `run_gates`)."""
        logits_EN = torch.addmm(self.proj.bias.unsqueeze(1), self.proj.weight, x_ND.t())
        return torch.softmax(logits_EN.float(), dim=0)


class AttentionGate(nn.Module):
    """A task query attends over the expert outputs: w = softmax((q + W_q x) . W_k y_e / sqrt(d)).

    The learned query q says what the task wants; W_q x adapts it to the row; keys come from what each
    expert actually produced for this row, so the gate sees expert outputs, not just the input.
    """

    def __init__(self, d_in: int, num_experts: int, d_expert: int, d_attn: int = 16) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.zeros(d_attn))
        self.q_proj = nn.Linear(d_in, d_attn)
        self.k_proj = nn.Linear(d_expert, d_attn, bias=False)
        self.scale = 1 / math.sqrt(d_attn)

    def forward(self, x_ND: Tensor, experts_ENO: Tensor) -> Tensor:
        """-> (E, N) weights, expert-major (see `run_gates`)."""
        q_NA = self.query + self.q_proj(x_ND)
        k_ENA = self.k_proj(experts_ENO)
        scores_EN = (q_NA * k_ENA).sum(-1) * self.scale
        return torch.softmax(scores_EN.float(), dim=0)


def build_gate(kind: str, d_in: int, num_experts: int, d_expert: int) -> nn.Module:
    """A softmax or attention gate over `num_experts` experts."""
    return (SoftmaxGate if kind == "softmax" else AttentionGate)(d_in, num_experts, d_expert)


def run_gates(gates: list[nn.Module], x_ND: Tensor, experts: list[Tensor]) -> list[Tensor]:
    """Each gate's (E_g, N) weights for one shared input row x. Softmax gates become one
    (sum E_g, D) x (D, N) GEMM instead of a small GEMM each (and one backward instead of many).

    Gates are expert-major, (E, N), softmax over dim 0: on CPU a softmax over a last dimension of
    4-8 experts is ~10x slower (forward + backward) than over the first, and `mix` wants this layout."""
    if len(gates) == 1 or not all(isinstance(gate, SoftmaxGate) for gate in gates):
        return [gate(x_ND, experts_ENO) for gate, experts_ENO in zip(gates, experts, strict=True)]
    weight = torch.cat([gate.proj.weight for gate in gates])
    bias = torch.cat([gate.proj.bias for gate in gates])
    logits_GN = torch.addmm(bias.unsqueeze(1), weight, x_ND.t()).float()
    sizes = [gate.proj.out_features for gate in gates]
    if len(set(sizes)) == 1:  # equal widths (MMoE): one softmax over a (gates, E, N) view
        return list(logits_GN.view(len(gates), sizes[0], -1).softmax(1).unbind(0))
    return [part.softmax(0) for part in logits_GN.split(sizes)]


def mix(gate_EN: Tensor, experts_ENO: Tensor) -> Tensor:
    """Gate-weighted sum of expert outputs: (E, N), (E, N, O) -> (N, O)."""
    # Broadcast-multiply and sum over the expert-major layout: N tiny (1, E) x (E, O) matmuls in a bmm
    # are ~2x slower on CPU, and one product over all E beats a product per group of experts even
    # after concatenating the groups.
    return (gate_EN.unsqueeze(-1).to(experts_ENO.dtype) * experts_ENO).sum(dim=0)


class CGCLevel(nn.Module):
    """One PLE extraction level (Customized Gate Control).

    Experts: T groups of `num_specific` task experts plus one group of `num_shared` shared experts.
    Inputs: one branch per task plus the shared branch (all equal at the first level). Outputs: one
    mixed vector per task, plus a shared one when another level follows.
    """

    def __init__(self, num_tasks: int, d_in: int, cfg: MultiTaskConfig, last: bool) -> None:
        super().__init__()
        self.num_tasks, self.last = num_tasks, last
        self.num_specific, self.num_shared = cfg.num_specific_experts, cfg.num_shared_experts
        self.batchnorm = cfg.expert_batchnorm
        bank = dict(d_in=d_in, d_hidden=cfg.expert_hidden, d_out=cfg.expert_dim,
                    residual=cfg.residual_experts, dropout=cfg.expert_dropout, batchnorm=cfg.expert_batchnorm)
        self.specific = ExpertBank(num_tasks, self.num_specific, **bank) if self.num_specific else None
        self.shared = ExpertBank(1, self.num_shared, **bank)
        per_task = self.num_specific + self.num_shared
        self.task_gates = nn.ModuleList(build_gate(cfg.gate, d_in, per_task, cfg.expert_dim)
                                        for _ in range(num_tasks))
        all_experts = num_tasks * self.num_specific + self.num_shared
        self.shared_gate = None if last else build_gate(cfg.gate, d_in, all_experts, cfg.expert_dim)

    def forward(self, branches: list[Tensor]) -> tuple[list[Tensor], list[Tensor], Tensor | None]:
        """T task branches + 1 shared branch, each (N, D) -> (T or T + 1 outputs (N, O), per-task gates
        (N, E_t), shared gate). Branches stay a list: indexing a stacked tensor would cost a full-size
        zero gradient per index in backward."""
        T = self.num_tasks
        # The first level: every branch is the same input row, so all banks and gates can share GEMMs.
        one_input = all(b is branches[0] for b in branches) and not self.batchnorm
        specific = None
        if one_input:
            banks = [self.shared] if self.specific is None else [self.specific, self.shared]
            *specific_GENO, shared_GENO = ExpertBank.run_on_one_input(banks, branches[0])
            specific = specific_GENO[0].unbind(0) if specific_GENO else None
        else:
            shared_GENO = self.shared(branches[T])
            if self.specific is not None:
                same_input = all(b is branches[0] for b in branches[:T])
                specific = self.specific(branches[0] if same_input else torch.stack(branches[:T])).unbind(0)
        shared_ENO = shared_GENO.squeeze(0)
        # Each gate's experts as one (E, N, O) tensor: a task's own experts then the shared ones; the
        # shared gate sees every expert (in `expert_names` order).
        task_experts = [shared_ENO if specific is None else torch.cat([specific[t], shared_ENO]) for t in range(T)]
        gate_modules, gate_experts = list(self.task_gates), task_experts
        if self.shared_gate is not None:
            gate_modules.append(self.shared_gate)
            gate_experts = [*task_experts, shared_ENO if specific is None else torch.cat([*specific, shared_ENO])]
        if one_input:
            gates = run_gates(gate_modules, branches[0], gate_experts)
        else:
            gates = [gate(b, experts) for gate, b, experts in zip(gate_modules, branches, gate_experts, strict=False)]
        outputs = [mix(gate_EN, experts_ENO) for gate_EN, experts_ENO in zip(gates, gate_experts, strict=True)]
        gates_NE = [gate_EN.t() for gate_EN in gates]  # row-major views for callers
        shared_gate_NE = gates_NE[T] if self.shared_gate is not None else None
        return outputs, gates_NE[:T], shared_gate_NE


# ---------------------------------------------------------------------------------------------- config


@documented
@dataclass
class MultiTaskOptions:
    """Architecture and sizes of a multi-task model, without the parts that come from the data
    (features, tasks): what a training config or a CLI holds before the data is loaded."""

    architecture: str = "mmoe"
    """shared_bottom, omoe (one gate for all tasks), mmoe (a gate per task) or ple (CGC levels)."""
    embed_dim: int = 4
    """Width of each categorical feature's embedding (census features have 3-53 values: a few suffice)."""
    input_batchnorm: bool = False
    """BatchNorm on the input row. Off by default: on Census-Income it cost ~0.005 income AUC (it
    rescales rare-category embeddings)."""
    input_dropout: float = 0.0
    """Dropout on the input row."""
    num_experts: int = 8
    """OMoE / MMoE: experts (two-layer ReLU MLPs, input -> expert_hidden -> expert_dim)."""
    expert_hidden: int = 64
    """Hidden width of each expert."""
    expert_dim: int = 32
    """Output width of each expert (the towers' input)."""
    expert_dropout: float = 0.0
    """Dropout inside the experts."""
    residual_experts: bool = False
    """Add a projection of the input to each expert's output."""
    expert_batchnorm: bool = False
    """BatchNorm inside experts, as torch-rechub's MLP experts have."""
    gate: str = "softmax"
    """'softmax' (a linear layer and a softmax over experts) or 'attention' (query-key scores)."""
    num_specific_experts: int = 2
    """PLE: experts per task at each CGC level."""
    num_shared_experts: int = 4
    """PLE: shared experts at each CGC level."""
    num_levels: int = 2
    """PLE: CGC levels."""
    bottom_widths: tuple[int, ...] = (128, 64)
    """Shared-Bottom: the shared network's widths (its last width feeds the towers)."""
    tower_widths: tuple[int, ...] = (32,)
    """Hidden widths of each task's tower (empty: one linear layer)."""
    tower_dropout: float = 0.0
    """Dropout inside the towers."""

    def __post_init__(self) -> None:
        self.bottom_widths, self.tower_widths = tuple(self.bottom_widths), tuple(self.tower_widths)
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {self.architecture!r}")
        if self.gate not in GATES:
            raise ValueError(f"gate must be one of {GATES}, got {self.gate!r}")
        if self.architecture in ("omoe", "mmoe") and self.num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {self.num_experts}")
        if self.architecture == "ple":
            if self.num_shared_experts < 1:
                raise ValueError(f"PLE needs num_shared_experts >= 1, got {self.num_shared_experts}")
            if self.num_specific_experts < 0 or self.num_levels < 1:
                raise ValueError(f"PLE needs num_specific_experts >= 0 and num_levels >= 1 (got "
                                 f"{self.num_specific_experts}, {self.num_levels})")
        if self.architecture == "shared_bottom" and not self.bottom_widths:
            raise ValueError("shared_bottom needs at least one bottom width")


@documented
@dataclass(kw_only=True)
class MultiTaskConfig(MultiTaskOptions):
    """Architecture of a multi-task model: the options plus `vocab_sizes`/`num_numeric` (from a
    FeatureSpec) and the tasks. Keyword-only, so the inherited defaults can come first."""

    vocab_sizes: tuple[int, ...]
    """Vocabulary size of each categorical feature (OOV bucket included)."""
    num_numeric: int
    """Numeric features."""
    tasks: tuple[str, ...] = ("task0", "task1")
    """Task names, one tower and one logit each."""
    task_types: tuple[str, ...] | None = None
    """'binary' or 'regression' per task (default: every task binary)."""

    @classmethod
    def from_options(cls, options: MultiTaskOptions, vocab_sizes: tuple[int, ...], num_numeric: int,
                     tasks: tuple[str, ...], task_types: tuple[str, ...] | None = None) -> MultiTaskConfig:
        values = {f.name: getattr(options, f.name) for f in fields(MultiTaskOptions)}
        return cls(vocab_sizes=vocab_sizes, num_numeric=num_numeric, tasks=tasks, task_types=task_types,
                   **values)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.vocab_sizes = tuple(int(v) for v in self.vocab_sizes)
        self.tasks = tuple(self.tasks)
        self.task_types = tuple(self.task_types or ("binary",) * len(self.tasks))
        if len(self.tasks) < 1 or len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"tasks must be one or more distinct names, got {self.tasks}")
        if len(self.task_types) != len(self.tasks):
            raise ValueError(f"task_types has {len(self.task_types)} entries for {len(self.tasks)} tasks")
        bad = [t for t in self.task_types if t not in TASK_TYPES]
        if bad:
            raise ValueError(f"task types must be in {TASK_TYPES}, got {bad}")
        if any(v < 1 for v in self.vocab_sizes) or self.num_numeric < 0:
            raise ValueError(f"vocab sizes must be >= 1 and num_numeric >= 0 (got {self.vocab_sizes}, "
                             f"{self.num_numeric})")
        if not self.vocab_sizes and self.num_numeric == 0:
            raise ValueError("the model needs at least one feature")


@dataclass
class MultiTaskOutput:
    """logits[task] (N,) before the output activation; gates[task] (N, E) mixing weights over
    `model.expert_names` (the last level for PLE; zero for experts a task's gate cannot see);
    expert_load (E,) mean gate weight per expert over rows and tasks; aux_loss is a zero scalar
    (soft gates route every row to every expert, so there is no balance loss to add)."""

    logits: dict[str, Tensor]
    gates: dict[str, Tensor] = field(default_factory=dict)
    expert_load: Tensor | None = None
    aux_loss: Tensor | None = None

    def predictions(self, task_types: dict[str, str]) -> dict[str, Tensor]:
        """Task outputs: sigmoid probabilities for binary tasks, raw values for regression."""
        return {t: torch.sigmoid(v) if task_types[t] == "binary" else v for t, v in self.logits.items()}


# ---------------------------------------------------------------------------------------------- model


class MultiTaskModel(Pretrained, nn.Module):
    """Shared-Bottom, OMoE, MMoE or PLE (by `config.architecture`), with a tower per task.

    `forward(cat_NC, num_NF)` takes encoded features (see `moekit.data.tabular.FeatureSpec`) and returns
    a `MultiTaskOutput` with one logit per row and task."""

    config_class = MultiTaskConfig
    family = "mtl"

    def __init__(self, config: MultiTaskConfig) -> None:
        super().__init__()
        self.config = cfg = config
        self.embedding = TabularEmbedding(cfg.vocab_sizes, cfg.embed_dim, cfg.num_numeric)
        d_in = self.embedding.out_dim
        self.input_norm = nn.BatchNorm1d(d_in) if cfg.input_batchnorm else nn.Identity()
        self.input_dropout = nn.Dropout(cfg.input_dropout) if cfg.input_dropout > 0 else nn.Identity()
        T = len(cfg.tasks)
        self.expert_names: list[str] = []
        if cfg.architecture == "shared_bottom":
            self.bottom = mlp(d_in, cfg.bottom_widths)
            d_tower = cfg.bottom_widths[-1]
        elif cfg.architecture in ("omoe", "mmoe"):
            self.experts = ExpertBank(1, cfg.num_experts, d_in, cfg.expert_hidden, cfg.expert_dim,
                                      cfg.residual_experts, cfg.expert_dropout, cfg.expert_batchnorm)
            num_gates = 1 if cfg.architecture == "omoe" else T
            self.gates = nn.ModuleList(build_gate(cfg.gate, d_in, cfg.num_experts, cfg.expert_dim)
                                       for _ in range(num_gates))
            self.expert_names = [f"expert {e}" for e in range(cfg.num_experts)]
            d_tower = cfg.expert_dim
        else:
            self.levels = nn.ModuleList(
                CGCLevel(T, d_in if level == 0 else cfg.expert_dim, cfg, last=level == cfg.num_levels - 1)
                for level in range(cfg.num_levels)
            )
            self.expert_names = [f"{task} {e}" for task in cfg.tasks for e in range(cfg.num_specific_experts)]
            self.expert_names += [f"shared {e}" for e in range(cfg.num_shared_experts)]
            d_tower = cfg.expert_dim
        self.towers = nn.ModuleList(
            nn.Sequential(mlp(d_tower, cfg.tower_widths, cfg.tower_dropout),
                          nn.Linear(cfg.tower_widths[-1] if cfg.tower_widths else d_tower, 1))
            for _ in range(T)
        )

    def forward(self, cat_NC: Tensor, num_NF: Tensor) -> MultiTaskOutput:
        cfg, T = self.config, len(self.config.tasks)
        x_ND = self.input_dropout(self.input_norm(self.embedding(cat_NC, num_NF)))
        gates: dict[str, Tensor] = {}
        if cfg.architecture == "shared_bottom":
            tower_in = [self.bottom(x_ND)] * T
        elif cfg.architecture in ("omoe", "mmoe"):
            experts_ENO = self.experts(x_ND).squeeze(0)
            gate_list = run_gates(list(self.gates), x_ND, [experts_ENO] * len(self.gates))
            if cfg.architecture == "omoe":
                gate_list = gate_list * T  # one gate, shared by every task
            tower_in = [mix(gate_EN, experts_ENO) for gate_EN in gate_list]
            gates = {task: gate_EN.t() for task, gate_EN in zip(cfg.tasks, gate_list, strict=True)}
        else:
            branches = [x_ND] * (T + 1)
            for level in self.levels:
                branches, task_gates, _ = level(branches)
            tower_in = branches[:T]
            gates = {task: self._place_ple_gate(t, g) for t, (task, g) in enumerate(zip(cfg.tasks, task_gates,
                                                                                         strict=True))}
        logits = {task: tower(h).squeeze(-1) for task, tower, h in zip(cfg.tasks, self.towers, tower_in,
                                                                       strict=True)}
        load = torch.stack(list(gates.values())).mean(dim=(0, 1)) if gates else None
        return MultiTaskOutput(logits, gates, load, x_ND.new_zeros(()))

    def _place_ple_gate(self, t: int, gate_NE: Tensor) -> Tensor:
        """A task gate over [own specific experts, shared experts] -> columns of `expert_names`."""
        S, T = self.config.num_specific_experts, len(self.config.tasks)
        full = gate_NE.new_zeros(gate_NE.shape[0], len(self.expert_names))
        full[:, t * S:(t + 1) * S] = gate_NE[:, :S]
        full[:, T * S:] = gate_NE[:, S:]
        return full

    def unreachable_experts(self) -> dict[str, list[int]]:
        """Per task, the indices (into `expert_names`) of experts its gate cannot weigh: under PLE, the
        other tasks' specific experts. Empty for the other architectures."""
        if self.config.architecture != "ple":
            return {}
        S, tasks = self.config.num_specific_experts, self.config.tasks
        return {task: [e for e in range(len(tasks) * S) if e // S != t] for t, task in enumerate(tasks)}

    @property
    def task_types(self) -> dict[str, str]:
        return dict(zip(self.config.tasks, self.config.task_types, strict=True))
