"""``tm.functional``: every differentiable op and loss as a function of tensors."""
from tinymoe.losses import cross_entropy, mse, nll  # noqa: F401
from tinymoe.ops import (abs, add, astype, broadcast_to, clip, concatenate, div, dropout,  # noqa: F401
                         erf, exp, gelu, getitem, linear, log, log_softmax, logsumexp, matmul,
                         max, maximum, mean, minimum, mul, neg, normal_cdf, one_hot, permute, pow,
                         relu, reshape, sigmoid, softmax, softplus, sqrt, squeeze, stack, sub,
                         sum, swapaxes, take_along_axis, tanh, topk, transpose, unsqueeze, var,
                         where)
