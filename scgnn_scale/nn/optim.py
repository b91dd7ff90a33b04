"""The optimiser of every network here: Adam with torch's multi-tensor (for-each) arithmetic.

Why not ``torch.optim.Adam`` itself: building any ``torch.optim.Optimizer`` imports ``torch._dynamo``
(its ``add_param_group`` is wrapped to keep the compiler out), and with it sympy: 1.0-1.4 CPU-s per
process on the 2-core VM, about 5% of a whole run on a 1,000-cell set, for a compiler no run here uses.
:class:`Adam` takes the same steps bit for bit (tests/test_autoencoder.py checks it against both of
torch's CPU implementations) and keeps torch's state-dict layout, so a checkpoint written with torch's Adam
(before cf2f9e1) resumes in it.

Why the for-each arithmetic and not the fused kernel: the fused kernel is faster (1.7 against 5.1 ms per
step of the feature autoencoder on the idle 2-core VM, next to 80-90 ms for its forward and backward
pass at 1,024 cells) and agrees to rounding per update, but the clusters it led to were worse: on the
eight gold data sets with three seeds each, the one-pass mean ARI fell from 0.612 to 0.543
(bench/RESULTS.md, "Quality from scratch with three seeds, and the optimiser"). Training diverges from
such differences within about fifty steps, and where the two runs' ARI differed by more than 0.04 on a
gold set the for-each one was the better one in 13 of 13 pairs. Why is not understood; the fused
kernel stays out until it is.
"""

from __future__ import annotations

from collections import defaultdict

import torch


class Adam:
    """Adam (Kingma and Ba) over a list of parameters: betas (0.9, 0.999), eps 1e-8, no weight decay.

    The interface the trainers use of a torch optimiser: ``zero_grad``, ``step``, ``param_groups[0]["lr"]``,
    ``state_dict`` and ``load_state_dict``. A parameter whose gradient is None is skipped, as torch does.
    """

    def __init__(self, parameters, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.params = list(parameters)
        self.param_groups = [{"lr": lr, "betas": betas, "eps": eps, "params": list(range(len(self.params)))}]
        self.state: dict[int, dict[str, torch.Tensor]] = {}

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if p.grad is None:
                continue
            if set_to_none:
                p.grad = None
            else:
                p.grad.detach_().zero_()

    def _state_of(self, i: int) -> dict[str, torch.Tensor]:
        if i not in self.state:
            p = self.params[i]
            # the step count is a float32 tensor on the CPU, as torch keeps it
            self.state[i] = {"step": torch.tensor(0.0),
                             "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                             "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}
        return self.state[i]

    @torch.no_grad()
    def step(self) -> None:
        group = self.param_groups[0]
        lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
        # one for-each call per device and dtype, as torch groups them
        by_kind: dict[tuple, list[int]] = defaultdict(list)
        for i, p in enumerate(self.params):
            if p.grad is not None:
                by_kind[(p.device, p.dtype)].append(i)
        for indices in by_kind.values():
            params = [self.params[i] for i in indices]
            grads = [p.grad for p in params]
            states = [self._state_of(i) for i in indices]
            steps = [s["step"] for s in states]
            exp_avgs = [s["exp_avg"] for s in states]
            exp_avg_sqs = [s["exp_avg_sq"] for s in states]
            torch._foreach_add_(steps, torch.tensor(1.0), alpha=1.0)
            torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
            torch._foreach_mul_(exp_avg_sqs, beta2)
            torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
            # bias corrections in Python floats (doubles), from the float32 step count
            counts = [s.item() for s in steps]
            step_sizes = [(lr / (1 - beta1 ** t)) * -1 for t in counts]
            bias_correction2_sqrt = [(1 - beta2 ** t) ** 0.5 for t in counts]
            denominators = torch._foreach_sqrt(exp_avg_sqs)
            torch._foreach_div_(denominators, bias_correction2_sqrt)
            torch._foreach_add_(denominators, eps)
            torch._foreach_addcdiv_(params, exp_avgs, denominators, step_sizes)

    def state_dict(self) -> dict:
        """torch's layout: ``state`` by parameter index, ``param_groups`` with the indices."""
        return {"state": {i: dict(s) for i, s in self.state.items()},
                "param_groups": [dict(g, params=list(g["params"])) for g in self.param_groups]}

    def load_state_dict(self, state_dict: dict) -> None:
        groups = state_dict["param_groups"]
        if len(groups) != 1 or len(groups[0]["params"]) != len(self.params):
            raise ValueError(f"optimiser state for {sum(len(g['params']) for g in groups)} parameters in "
                             f"{len(groups)} groups, the model has {len(self.params)} in one")
        saved = groups[0]
        self.param_groups[0].update(lr=saved["lr"], betas=tuple(saved.get("betas", (0.9, 0.999))),
                                    eps=saved.get("eps", 1e-8))
        position = {index: i for i, index in enumerate(saved["params"])}
        self.state = {}
        for index, s in state_dict["state"].items():
            i = position[int(index)]
            p = self.params[i]
            self.state[i] = {"step": s["step"].detach().clone().to("cpu", torch.float32),
                             "exp_avg": s["exp_avg"].detach().to(p.device, p.dtype).clone(),
                             "exp_avg_sq": s["exp_avg_sq"].detach().to(p.device, p.dtype).clone()}


def adam(parameters, lr: float) -> Adam:
    """Adam over ``parameters`` with learning rate ``lr`` (see :class:`Adam`)."""
    return Adam(parameters, lr=lr)
