"""The query engine: one model replica that evaluates shards of perturbed forward passes.

Per query ``q`` of sample ``j`` in group ``g`` (paper eqs. 1-3, DESIGN section 1), with ``c_q = (L_q - b_j)/sigma``:

- LR (perturb outputs of ``nn.Linear`` modules, ``y = W h + b + sigma*eps``):
  ``G_W = c_q * sum_t eps_t h_t^T``, ``G_b = c_q * sum_t eps_t``.
- SPSA / ES (perturb parameters ``theta + sigma*eps``): ``G = c_q * eps``.

Antithetic pairs use ``(+eps, -eps)``; averaging a pair's two terms gives ``(L+ - L-)/(2 sigma) * D``
when ``D`` flips sign with ``eps`` (SPSA). ``b_j`` is the sample's clean loss for every estimator.
Every term is additive, so a sample's estimate over ``[q0, q1)`` can be computed in pieces and summed.

The engine imports no ray and touches no files: the same object runs in-process and inside actors.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, vmap

from flops_ray.blackbox import BlackBox, BlackBoxError, BlackBoxShapeError
from flops_ray.config import ConfigError, EstimatorConfig, GroupConfig
from flops_ray.groups import ResolvedGroup, flatten, resolve_groups, unflatten_into
from flops_ray.messages import CLEAN, FINALIZE, MAIN, PILOT, ShardResult, ShardTask
from flops_ray.seeding import STREAM_TRACE, generator, query_noise

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-sample cross entropy, ``(R, C), (R,) -> (R,)``."""
    return nn.functional.cross_entropy(logits, targets, reduction="none")


class NonFiniteLossError(FloatingPointError):
    """A query produced a NaN or inf loss; the message names the shard and the sample."""


def model_outputs(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and a per-sample embedding (timm pre-logits / CLS token; the logits for other models)."""
    if hasattr(model, "forward_features") and hasattr(model, "forward_head"):
        feats = model.forward_features(x)
        return model.forward_head(feats), model.forward_head(feats, pre_logits=True)
    logits = model(x)
    return logits, logits


class QueryEngine:
    """A model replica evaluating :class:`~flops_ray.messages.ShardTask` s.

    Args:
        model: the model; its group parameters are the trainable ones.
        groups: layer groups (see :class:`~flops_ray.config.GroupConfig`).
        estimator: estimator settings.
        root_seed: the run's root seed.
        loss_fn: per-sample loss ``(outputs (R, ...), targets (R,)) -> (R,)``.
        device: where the replica runs; noise is drawn on CPU and copied once per shard.
    """

    def __init__(
        self,
        model: nn.Module,
        groups: tuple[GroupConfig, ...],
        estimator: EstimatorConfig,
        root_seed: int,
        loss_fn: LossFn = cross_entropy,
        device: str | torch.device = "cpu",
    ):
        if isinstance(model, BlackBox) and estimator.kind not in ("spsa", "es"):
            raise ConfigError(
                f"estimator.kind: a BlackBox is queried through its losses only; use spsa or es, got {estimator.kind!r}"
            )
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.groups = resolve_groups(self.model, groups, estimator.kind)
        self.est = estimator
        self.root_seed = root_seed
        self.loss_fn = loss_fn
        self.dtype = next(self.model.parameters()).dtype
        self._step = -1
        self._x: torch.Tensor | None = None
        self._y: torch.Tensor | None = None
        self._out_numel: dict[int, list[int]] = {}
        self._pilot_cache: dict[tuple[int, int], tuple[torch.Tensor, np.ndarray]] = {}
        self._skipped = 0

    # ---- parameters and batch -------------------------------------------------------------------
    def trainable(self) -> list[nn.Parameter]:
        """All group parameters, group by group, in flat order."""
        return [p for g in self.groups for _, p in g.params]

    def get_params(self) -> torch.Tensor:
        """``(P,)`` trainable parameters as one CPU vector."""
        return flatten([p.detach() for p in self.trainable()]).cpu()

    def set_params(self, flat: torch.Tensor | np.ndarray) -> None:
        """Load the ``(P,)`` trainable vector (one host-to-device copy)."""
        flat = torch.as_tensor(flat).to(self.device, self.dtype)
        with torch.no_grad():
            unflatten_into(flat, self.trainable())

    def set_batch(self, step: int, x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray) -> None:
        """Make ``(x, y)`` the batch of ``step``; forgets the previous step's pilot sums."""
        self._step = step
        x = torch.as_tensor(x)
        # Token ids and other integer inputs keep their dtype; only floating inputs follow the model's.
        self._x = x.to(self.device, self.dtype if x.is_floating_point() else x.dtype)
        self._y = torch.as_tensor(y).to(self.device)
        self._pilot_cache.clear()

    # ---- task dispatch ---------------------------------------------------------------------------
    @torch.no_grad()
    def run(self, task: ShardTask) -> ShardResult:
        """Evaluate one shard task (see :class:`~flops_ray.messages.ShardTask` for the kinds)."""
        if self._x is None or task.step != self._step:
            raise RuntimeError(f"replica holds the batch of step {self._step}, task {task.key} needs step {task.step}")
        self._skipped = 0
        if task.kind == CLEAN:
            return self._clean(task)
        group = self.groups[task.group]
        if task.kind == PILOT:
            sums, losses, traces, forwards = self._pilot(task, group)
            return ShardResult(task.key, losses, traces=traces, forwards=forwards, skipped=self._skipped)
        weights = torch.tensor(task.weights, dtype=torch.float64, device=self.device)
        if task.kind == FINALIZE:
            sums, losses, _, forwards = self._pilot(task, group)
            grad = weights @ sums
        elif task.kind == MAIN:
            rows = self._rows(task)
            losses_t, grad_fn = self._evaluate(task, group, rows)
            coef = self._coefficients(task, rows, losses_t)
            grad = grad_fn(coef * weights[rows["item"]])[0][0]
            losses, forwards = losses_t.cpu().numpy(), len(rows["item"])
        else:
            raise ValueError(f"unknown task kind {task.kind!r}")
        return ShardResult(task.key, losses, grad=grad.cpu().numpy(), forwards=forwards, skipped=self._skipped)

    def _clean(self, task: ShardTask) -> ShardResult:
        pos = torch.tensor([it.pos for it in task.items], device=self.device)
        if isinstance(self.model, BlackBox):
            # A black box has no embedding to offer; its inputs stand in for the allocator's kernel.
            u = self.model.search.value.detach()
            losses = self._box_losses(task, u.expand(len(pos), -1), pos, policy="raise")
            emb = self._x[pos].flatten(1)
        else:
            logits, emb = model_outputs(self.model, self._x[pos])
            losses = self.loss_fn(logits, self._y[pos])
        # A sample without a finite clean loss has no baseline to weight its queries by: always an error.
        self._check_finite(task, losses, [it.pos for it in task.items], policy="raise")
        return ShardResult(
            task.key,
            losses.double().cpu().numpy(),
            embeddings=emb.double().cpu().numpy(),
            forwards=len(task.items),
        )

    def _pilot(self, task: ShardTask, group: ResolvedGroup):
        """Per-item gradient sums ``(n_items, P_g)`` (unweighted), losses and trace estimates; cached."""
        key = (task.group, task.index)
        cached = self._pilot_cache.get(key)
        if cached is not None:
            return cached[0], cached[1], None, 0
        rows = self._rows(task)
        losses, grad_fn = self._evaluate(task, group, rows)
        coef = self._coefficients(task, rows, losses)
        onehot = nn.functional.one_hot(rows["item"], len(task.items)).to(torch.float64)
        idx = self._trace_coords(task.step, group)
        sums, sub = grad_fn(coef, onehot, idx)
        traces = self._traces(task, rows, sub, group.size / idx.numel())
        losses_np = losses.cpu().numpy()
        self._pilot_cache[key] = (sums, losses_np)
        return sums, losses_np, traces, len(rows["item"])

    # ---- rows, noise, coefficients -----------------------------------------------------------------
    def _rows(self, task: ShardTask) -> dict[str, torch.Tensor]:
        """Expand items into per-query rows: batch position, item index, noise draw, sign (``(R,)`` each)."""
        unit = self.est.unit
        pos, item, draw_key, sign = [], [], [], []
        for i, it in enumerate(task.items):
            for q in range(it.q0, it.q1):
                pos.append(it.pos)
                item.append(i)
                draw_key.append((it.sample_id, q // unit))
                sign.append(-1.0 if (unit == 2 and q % 2) else 1.0)
        draws = list(dict.fromkeys(draw_key))
        draw_of = {d: k for k, d in enumerate(draws)}
        dev = self.device
        return {
            "pos": torch.tensor(pos, device=dev),
            "item": torch.tensor(item, device=dev),
            "draw": torch.tensor([draw_of[d] for d in draw_key], device=dev),
            "sign": torch.tensor(sign, device=dev, dtype=self.dtype),
            "draws": draws,
        }

    def _noise(self, task: ShardTask, rows, size: int) -> torch.Tensor:
        """``(R, size)`` signed noise: one CPU draw per pair/query, one host-to-device copy per shard."""
        draws = torch.stack(
            [query_noise(self.root_seed, task.step, sid, d, task.group, size, self.dtype) for sid, d in rows["draws"]]
        )
        if self.device.type == "cuda":
            draws = draws.pin_memory().to(self.device, non_blocking=True)
        return draws[rows["draw"]] * rows["sign"][:, None]

    def _coefficients(self, task: ShardTask, rows, losses: torch.Tensor) -> torch.Tensor:
        """``(R,)`` ``c_q = (L_q - L_clean,j) / sigma`` in float64.

        The clean-loss baseline is subtracted for every estimator: it keeps the estimate unbiased
        (``E[eps] = 0`` given the upstream noise), cancels exactly within an SPSA pair, and within an LR
        pair it removes the ``L_clean * eps (h+ - h-)^T`` term that appears when a group's upstream
        module shifts the input ``h`` of a later one.
        """
        sigma = self.groups[task.group].sigma
        base = torch.tensor([it.baseline for it in task.items], dtype=torch.float64, device=self.device)
        coef = (losses.double() - base[rows["item"]]) / sigma
        # Skipped (non-finite) queries contribute nothing; under "raise" none reach this point.
        return torch.where(torch.isfinite(coef), coef, torch.zeros_like(coef))

    def _check_finite(self, task: ShardTask, losses: torch.Tensor, pos: list[int], policy: str | None = None) -> None:
        """Raise on a non-finite loss (``estimator.on_nonfinite = "raise"``), or count it as skipped."""
        bad = (~torch.isfinite(losses)).nonzero().flatten().tolist()
        if not bad:
            return
        if (policy or self.est.on_nonfinite) == "skip":
            self._skipped += len(bad)
            return
        row = pos[bad[0]]
        raise NonFiniteLossError(
            f"shard {task.key}: loss is {losses[bad[0]].item()} for batch row {row} "
            f"(sample {self._sample_of(task, row)}; {len(bad)} non-finite of {len(pos)} queries); "
            "set estimator.on_nonfinite=skip to drop such queries instead"
        )

    @staticmethod
    def _sample_of(task: ShardTask, row: int) -> int:
        return next(it.sample_id for it in task.items if it.pos == row)

    def _box_losses(
        self, task: ShardTask, u: torch.Tensor, pos: torch.Tensor, policy: str | None = None
    ) -> torch.Tensor:
        """The black box on rows ``u (R, d)`` at batch positions ``pos (R,)``; errors name the shard and samples."""
        try:
            return self.model.losses(u, self._x[pos], self._y[pos])
        except BlackBoxError as exc:
            samples = sorted({self._sample_of(task, r) for r in pos.tolist()})
            if (policy or self.est.on_nonfinite) == "skip" and not isinstance(exc, BlackBoxShapeError):
                # The policy drops the whole call: its rows become non-finite and are counted as skipped.
                return torch.full((len(u),), float("nan"), dtype=u.dtype, device=u.device)
            raise type(exc)(f"shard {task.key}, samples {samples}: {exc}") from exc

    def _trace_coords(self, step: int, group: ResolvedGroup) -> torch.Tensor:
        """``(K,)`` sorted coordinates of the group sub-sampled for trace estimates (same on every replica)."""
        k = min(self.est.trace_coords, group.size)
        g = generator(self.root_seed, STREAM_TRACE, step, group.index)
        return torch.randperm(group.size, generator=g)[:k].sort().values.to(self.device)

    def _traces(self, task: ShardTask, rows, sub: torch.Tensor, scale: float) -> np.ndarray:
        """``T_j ~ unit * (P/K) * sum_k Var_units[G_unit,k]`` from the pilot's per-row sub-sampled terms ``(R, K)``.

        A unit is one independent draw (a pair's mean for antithetic estimators); per-query variance is
        ``unit`` times the unit variance, which is what ``J(A) = sum T_j / A_j`` counts. A pilot of one
        draw (MeZO) has no variance to measure: NaN, which only trace-free allocators accept.
        """
        unit = self.est.unit
        out = np.full(len(task.items), np.nan)
        for i in range(len(task.items)):
            g = sub[rows["item"] == i]
            g = g.view(-1, unit, g.shape[-1]).mean(1)
            if len(g) > 1:
                out[i] = unit * scale * g.var(dim=0, unbiased=True).sum().item()
        return out

    # ---- batched perturbed forwards ----------------------------------------------------------------
    def _evaluate(self, task: ShardTask, group: ResolvedGroup, rows):
        """Run the shard's perturbed forwards in chunks of ``max_rows``.

        Returns:
            ``losses (R,)`` and ``grad_fn(coef (R,), seg (R, S) | None, idx (K,) | None)`` giving the
            ``(S, P_g)`` segment sums of ``coef * D`` (S = 1 when ``seg`` is None) and, with ``idx``, the
            per-row sub-sampled terms ``(R, K)``.
        """
        if self.est.kind == "lr":
            return self._evaluate_lr(task, group, rows)
        return self._evaluate_params(task, group, rows)

    def _chunks(self, n: int):
        step = self.est.max_rows
        return [slice(s, min(n, s + step)) for s in range(0, n, step)]

    def _evaluate_params(self, task: ShardTask, group: ResolvedGroup, rows):
        eps = self._noise(task, rows, group.size)  # (R, P_g), signed
        if isinstance(self.model, BlackBox):
            return self._evaluate_box(task, group, rows, eps)
        names = [n for n, _ in group.params]
        shapes = [p.shape for _, p in group.params]
        base = {n: p.detach() for n, p in self.model.named_parameters()}
        base.update({n: b for n, b in self.model.named_buffers()})
        model = self.model

        def one(delta_flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            chunks = torch.split(delta_flat, [s.numel() for s in shapes])
            params = dict(base)
            for n, d, s in zip(names, chunks, shapes):
                params[n] = base[n] + d.view(s)
            return functional_call(model, params, (x.unsqueeze(0),))[0]

        losses = []
        with warnings.catch_warnings():
            # vmap falls back to a loop for fused attention kernels; correct, only slower.
            warnings.filterwarnings("ignore", message=".*batching rule.*")
            for sl in self._chunks(len(rows["pos"])):
                out = vmap(one)(group.sigma * eps[sl], self._x[rows["pos"][sl]])
                losses.append(self.loss_fn(out, self._y[rows["pos"][sl]]))
        return self._param_result(task, rows, eps, torch.cat(losses))

    def _evaluate_box(self, task: ShardTask, group: ResolvedGroup, rows, eps: torch.Tensor):
        """Black box: one call of the user's function per chunk of rows, with ``u + sigma * eps``."""
        u = group.params[0][1].detach()
        losses = [
            self._box_losses(task, u + group.sigma * eps[sl], rows["pos"][sl]) for sl in self._chunks(len(rows["pos"]))
        ]
        return self._param_result(task, rows, eps, torch.cat(losses))

    def _param_result(self, task: ShardTask, rows, eps: torch.Tensor, losses: torch.Tensor):
        """Parameter-perturbation losses ``(R,)`` and their ``grad_fn`` (``G = c * eps``)."""
        self._check_finite(task, losses, rows["pos"].tolist())

        def grad_fn(coef, seg=None, idx=None):
            w = coef[:, None] if seg is None else seg * coef[:, None]  # (R, S)
            sums = w.T @ eps.double()  # (S, P_g)
            sub = (coef[:, None] * eps[:, idx].double()) if idx is not None else None
            return sums, sub

        return losses, grad_fn

    def _evaluate_lr(self, task: ShardTask, group: ResolvedGroup, rows):
        numel = self._output_numel(group)
        eps_all = self._noise(task, rows, sum(numel))  # (R, N), signed
        offsets = np.cumsum([0, *numel]).tolist()
        captured: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {i: [] for i in range(len(numel))}
        current: dict[str, torch.Tensor] = {}

        def make_hook(m: int):
            def hook(module, inputs, out):
                eps = current["eps"][:, offsets[m] : offsets[m + 1]].view(out.shape)
                captured[m].append((inputs[0].detach(), eps))
                return out + group.sigma * eps

            return hook

        losses = []
        with self._hooks(group, make_hook):
            for sl in self._chunks(len(rows["pos"])):
                current["eps"] = eps_all[sl]
                out = self.model(self._x[rows["pos"][sl]])
                losses.append(self.loss_fn(out, self._y[rows["pos"][sl]]))
        losses_t = torch.cat(losses)
        self._check_finite(task, losses_t, rows["pos"].tolist())
        h = {m: torch.cat([c[0] for c in v]) for m, v in captured.items()}
        e = {m: torch.cat([c[1] for c in v]) for m, v in captured.items()}

        def grad_fn(coef, seg=None, idx=None):
            w = coef[:, None] if seg is None else seg * coef[:, None]  # (R, S)
            sums = torch.stack([self._lr_segment_sum(group, h, e, w[:, s]) for s in range(w.shape[1])])
            sub = self._lr_subsample(group, h, e, coef, idx) if idx is not None else None
            return sums, sub  # (S, P_g), (R, K)

        return losses_t, grad_fn

    @staticmethod
    def _lr_segment_sum(group: ResolvedGroup, h, e, w: torch.Tensor) -> torch.Tensor:
        """``sum_r w_r sum_t eps_rt h_rt^T`` (and ``sum_r w_r sum_t eps_rt`` for biases) as one matmul per linear.

        Only rows with ``w_r != 0`` enter, so a pilot's per-sample sums cost no more than one weighted sum.
        """
        rows = w.nonzero().flatten()
        wr = w[rows]
        parts = []
        for m, (_, lin) in enumerate(group.linears):
            hm = h[m][rows].double().reshape(len(rows), -1, h[m].shape[-1])  # (R, T, C_in)
            em = e[m][rows].double().reshape(len(rows), -1, e[m].shape[-1]) * wr[:, None, None]  # (R, T, C_out)
            parts.append((em.flatten(0, 1).T @ hm.flatten(0, 1)).flatten())
            if lin.bias is not None:
                parts.append(em.sum((0, 1)))
        return torch.cat(parts)

    def _lr_subsample(self, group, h, e, coef, idx) -> torch.Tensor:
        """Per-row LR terms at flat coordinates ``idx``: ``(R, K)`` without materialising ``(R, P_g)``."""
        cols = []
        offset = 0
        for m, (_, lin) in enumerate(group.linears):
            hm = h[m].double().reshape(h[m].shape[0], -1, h[m].shape[-1])
            em = e[m].double().reshape(e[m].shape[0], -1, e[m].shape[-1])
            n_out, n_in = lin.weight.shape
            for is_bias, n in ((False, n_out * n_in), (True, n_out if lin.bias is not None else 0)):
                sel = idx[(idx >= offset) & (idx < offset + n)] - offset
                if sel.numel():
                    if is_bias:
                        cols.append(em[:, :, sel].sum(1))
                    else:
                        cols.append((em[:, :, sel // n_in] * hm[:, :, sel % n_in]).sum(1))
                offset += n
        # A skipped row may carry non-finite activations; 0 * inf would put NaN into its trace.
        terms = coef[:, None] * torch.cat(cols, dim=1)
        return torch.where(coef[:, None] != 0, terms, 0.0)

    @contextlib.contextmanager
    def _hooks(self, group: ResolvedGroup, make_hook):
        handles = [lin.register_forward_hook(make_hook(m)) for m, (_, lin) in enumerate(group.linears)]
        try:
            yield
        finally:
            for hnd in handles:
                hnd.remove()

    def _output_numel(self, group: ResolvedGroup) -> list[int]:
        """Per-sample output size of each of the group's linears, probed once with one clean sample."""
        if group.index not in self._out_numel:
            sizes: dict[int, int] = {}

            def make_probe(m: int):
                def probe(module, inputs, out):
                    sizes[m] = out[0].numel()

                return probe

            with self._hooks(group, make_probe):
                self.model(self._x[:1])
            self._out_numel[group.index] = [sizes[m] for m in range(len(group.linears))]
        return self._out_numel[group.index]
