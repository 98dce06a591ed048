"""Adapters for Hugging Face transformers' Switch and Mixtral MoE code (needs torch and
transformers; both are imported when an adapter is made, not when this module is).

    python -m pytest -p tinymoe.conformance.plugin --pyargs tinymoe.conformance \\
        --moe-impl tinymoe.conformance.hf_adapters:HFSwitch
    python -m pytest -p tinymoe.conformance.plugin --pyargs tinymoe.conformance \\
        --moe-impl tinymoe.conformance.hf_adapters:HFMixtral

They feed the suite's arrays through the real classes (``SwitchTransformersTop1Router``,
``SwitchTransformersSparseMLP``, ``MixtralTopKRouter``, ``MixtralSparseMoeBlock``) and the
real loss functions. To hand a router *logits*, its classifier is the identity (d_model =
E, weight I), which is exact in any precision. Expert weights are mapped for both layouts:
recent releases store Mixtral's experts fused into 3-D tensors (``gate_up_proj``,
``down_proj``), older ones as a ModuleList of ``w1``/``w2``/``w3`` Linears.
``conventions`` holds what the suite found them to follow (tests/test_conformance_hf.py
re-detects it on every run); a method raises NotImplementedError for a case the HF code
cannot express (HF's Switch is top-1 only), which the suite skips.
"""
from __future__ import annotations

import numpy as np


def _torch():
    import torch

    return torch


def _tensor(a, dtype=None):
    """A NumPy array as a torch tensor (the ``bfloat16`` case's arrays as bfloat16)."""
    from tinymoe.conformance import is_bfloat16

    torch = _torch()
    t = torch.from_numpy(np.ascontiguousarray(np.asarray(a)))
    if is_bfloat16(a):
        t = t.to(torch.bfloat16)
    return t if dtype is None else t.to(dtype)


def _eye_linear(linear, E):
    torch = _torch()
    with torch.no_grad():
        linear.weight.copy_(torch.eye(E, dtype=linear.weight.dtype))


class HFSwitch:
    """transformers' Switch Transformer: ``SwitchTransformersTop1Router``,
    ``SwitchTransformersSparseMLP``, ``load_balancing_loss_func``, ``router_z_loss_func``."""

    # what the suite found (transformers 5.x); see the docs' conventions table
    conventions = {"aux_pooling": "pooled", "router_precision": "input"}
    tolerance = dict(rtol=1e-4, atol=1e-5)  # the layer runs in float32

    def __init__(self) -> None:
        from transformers.models.switch_transformers import modeling_switch_transformers as m
        from transformers import SwitchTransformersConfig

        self.m, self.Config = m, SwitchTransformersConfig
        self._made = {}  # modules by shape: making one is slow, their weights are reset

    def _module(self, cls, d, E, capacity, **kw):
        key = (cls.__name__, d, E, capacity, tuple(sorted(kw.items())))
        if key not in self._made:
            self._made[key] = cls(self._config(d, E, capacity, **kw)).eval()
        return self._made[key]

    def _config(self, d, E, capacity, **kw):
        return self.Config(d_model=d, num_experts=E, expert_capacity=capacity, router_bias=False,
                           router_jitter_noise=0.0, router_dtype="float32", dropout_rate=0.0,
                           **kw)

    def _route(self, logits, capacity):
        """(mask (T, E) after capacity, top probability (T,)) from HF's router."""
        torch = _torch()
        T, E = logits.shape
        router = self._module(self.m.SwitchTransformersTop1Router, E, E, capacity)
        _eye_linear(router.classifier, E)
        x = _tensor(logits)
        with torch.no_grad():
            mask, probs, _ = router(x.reshape(1, T, E))
        return mask[0].numpy(), probs[0, :, 0].float().numpy()

    def top1_router(self, logits):
        mask, p = self._route(logits, max(logits.shape[0], 1))
        return mask.argmax(axis=1) if mask.size else np.zeros(0, np.int64), p

    def capacity_positions(self, expert_index, num_experts, capacity):
        if expert_index.shape[1] != 1:
            raise NotImplementedError("HF's Switch router is top-1 only")
        logits = 10.0 * np.eye(num_experts, dtype=np.float32)[expert_index[:, 0]]  # (T, E)
        mask, _ = self._route(logits, capacity)  # (T, E) kept choices
        slot = np.cumsum(mask, axis=0) - 1  # (T, E) rank among the expert's kept tokens
        kept = mask.sum(axis=1) > 0
        pos = np.where(kept, slot[np.arange(len(mask)), expert_index[:, 0]], -1)
        return pos[:, None]

    def switch_aux_loss(self, layer_probs, layer_expert_index):
        """As SwitchTransformersForConditionalGeneration: the layers' router outputs are
        concatenated along the sequence axis (``_unpack_router_logits``), one loss."""
        torch = _torch()
        probs = torch.cat([_tensor(p)[None] for p in layer_probs], dim=1)  # (1, ΣT, E)
        idx = torch.cat([_tensor(np.asarray(e, np.int64))[None] for e in layer_expert_index],
                        dim=1)
        return float(self.m.load_balancing_loss_func(probs, idx))

    def z_loss(self, logits):
        return float(self.m.router_z_loss_func(_tensor(logits)[None].float()))

    def switch_layer(self, x, router_weight, w_in, w_out, capacity):
        torch = _torch()
        T, d = x.shape
        E, _, f = w_in.shape
        mlp = self._module(self.m.SwitchTransformersSparseMLP, d, E, capacity, d_ff=f,
                           dense_act_fn="relu")
        with torch.no_grad():
            mlp.router.classifier.weight.copy_(_tensor(router_weight.T.astype(np.float32)))
            for e in range(E):
                expert = mlp.experts[f"expert_{e}"]
                expert.wi.weight.copy_(_tensor(w_in[e].T.astype(np.float32)))
                expert.wo.weight.copy_(_tensor(w_out[e].T.astype(np.float32)))
            y = mlp(_tensor(x.astype(np.float32)).reshape(1, T, d))
        y = y[0] if isinstance(y, torch.Tensor) else y[0][0]  # older releases: (y, router)
        return y.numpy().astype(np.float64)


class HFMixtral:
    """transformers' Mixtral: ``MixtralTopKRouter`` (or the gate Linear of older releases),
    ``MixtralSparseMoeBlock`` and ``load_balancing_loss_func``."""

    conventions = {"aux_pooling": "pooled", "mixtral_k_factor": True, "tie_breaking": "any"}
    tolerance = dict(rtol=1e-4, atol=1e-5)  # the router's softmax runs in float32

    def __init__(self) -> None:
        from transformers.models.mixtral import modeling_mixtral as m
        from transformers import MixtralConfig

        self.m, self.Config = m, MixtralConfig

    def _config(self, d, E, k, f=8):
        return self.Config(hidden_size=d, intermediate_size=f, num_local_experts=E,
                           num_experts_per_tok=k, router_jitter_noise=0.0, hidden_act="silu")

    def _block(self, d, E, k, f=8):
        return self.m.MixtralSparseMoeBlock(self._config(d, E, k, f)).eval()

    def topk_router(self, logits, k):
        torch = _torch()
        T, E = logits.shape
        block = self._block(E, E, k)
        gate = block.gate
        x = _tensor(logits)
        with torch.no_grad():
            if hasattr(self.m, "MixtralTopKRouter"):
                gate = gate.to(x.dtype)
                _eye_linear(gate, E)
                _, weight, expert = gate(x)
            else:  # older releases: the block's forward does the top-k
                raise NotImplementedError("this transformers release has no MixtralTopKRouter")
        return expert.numpy(), weight.float().numpy()

    def mixtral_aux_loss(self, layer_logits, k):
        E = layer_logits[0].shape[1]
        loss = self.m.load_balancing_loss_func(tuple(_tensor(z) for z in layer_logits), E, k)
        return float(loss)

    def mixtral_layer(self, x, router_weight, w_gate, w_up, w_down, k):
        torch = _torch()
        T, d = x.shape
        E, _, f = w_gate.shape
        block = self._block(d, E, k, f).double()
        with torch.no_grad():
            block.gate.weight.copy_(_tensor(router_weight.T))
            ex = block.experts
            if hasattr(ex, "gate_up_proj"):  # fused 3-D experts (transformers >= 5)
                up = np.concatenate([w_gate.transpose(0, 2, 1), w_up.transpose(0, 2, 1)], 1)
                if ex.gate_up_proj.shape[1:] != up.shape[1:]:
                    up = up.transpose(0, 2, 1)  # a release storing (E, d, 2f)
                ex.gate_up_proj.copy_(_tensor(up))
                down = w_down.transpose(0, 2, 1)  # (E, d, f)
                if ex.down_proj.shape[1:] != down.shape[1:]:
                    down = w_down
                ex.down_proj.copy_(_tensor(down))
            else:  # a ModuleList of experts with w1 (gate), w3 (up), w2 (down) Linears
                for e in range(E):
                    ex[e].w1.weight.copy_(_tensor(w_gate[e].T))
                    ex[e].w3.weight.copy_(_tensor(w_up[e].T))
                    ex[e].w2.weight.copy_(_tensor(w_down[e].T))
            y = block(_tensor(x).reshape(1, T, d))
        y = y if isinstance(y, torch.Tensor) else y[0]  # older releases: (y, router_logits)
        return y[0].numpy()
