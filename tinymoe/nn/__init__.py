"""``tm.nn``: modules (layers with parameters) and checkpoints.

    model = tm.nn.FeedForward(16, 64, rng=0)
    y = model(x)                       # calls model.forward(x)
    tm.nn.save(model, "ckpt.npz", metadata={"step": 100})
    tm.nn.load_into(model, "ckpt.npz")
"""
from tinymoe.nn.attention import CausalSelfAttention
from tinymoe.nn.dropout import Dropout
from tinymoe.nn.embedding import Embedding
from tinymoe.nn.feedforward import FeedForward
from tinymoe.nn.init import as_rng
from tinymoe.nn.layernorm import LayerNorm
from tinymoe.nn.linear import Linear
from tinymoe.nn.module import LoadResult, Module, ModuleList, Parameter
from tinymoe.nn.rmsnorm import RMSNorm
from tinymoe.nn.serialization import load, load_into, save
from tinymoe.nn.swiglu import SwiGLU

__all__ = ["CausalSelfAttention", "Dropout", "Embedding", "FeedForward", "LayerNorm", "Linear",
           "LoadResult", "Module", "ModuleList", "Parameter", "RMSNorm", "SwiGLU", "as_rng",
           "load", "load_into", "save"]
