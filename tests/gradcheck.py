"""Numerical gradient checking shared by the layer tests (central differences in float64)."""
import numpy as np


def as_float64(layer):
    """Cast every parameter and buffer of ``layer`` (and its children) to float64 in place."""
    for _, sub in layer.named_layers():
        for attr in sub.param_names + sub.buffer_names:
            setattr(sub, attr, getattr(sub, attr).astype(np.float64))
    return layer


def numerical_grad(f, x, eps=1e-6):
    """d f() / d x by central differences; ``f`` reads ``x`` (modified in place and restored)."""
    grad = np.zeros_like(x)
    it = np.nditer(x, flags=["multi_index"], op_flags=["readwrite"])
    for _ in it:
        i = it.multi_index
        old = x[i]
        x[i] = old + eps
        fp = f()
        x[i] = old - eps
        fm = f()
        x[i] = old
        grad[i] = (fp - fm) / (2 * eps)
    return grad


def check_layer_gradients(layer, x, train=True, seed=0, rtol=1e-5, atol=1e-6, reseed=None):
    """Compare ``layer.backward`` with numerical gradients of ``sum(forward(x) * r)`` for a random r.

    ``reseed`` (callable) restores any random state before each forward (e.g. dropout masks).
    """
    rng = np.random.default_rng(seed)
    x = x.astype(np.float64)

    def run():
        if reseed is not None:
            reseed()
        return layer.forward(x, train=train)

    out = run()
    r = rng.standard_normal(out.shape)
    f = lambda: float((run() * r).sum())  # noqa: E731
    run()
    dx = layer.backward(r.copy())
    analytic = {"x": dx}
    for path, sub, attr in layer.named_arrays(buffers=False):
        analytic[path] = getattr(sub, "d" + attr)
    numeric = {"x": numerical_grad(f, x)}
    for path, sub, attr in layer.named_arrays(buffers=False):
        numeric[path] = numerical_grad(f, getattr(sub, attr))
    for key in analytic:
        np.testing.assert_allclose(analytic[key], numeric[key], rtol=rtol, atol=atol,
                                   err_msg=f"gradient of {key}")
