"""The model's training losses: OFG supervision, the unsupervised loss, and their mix.

- :func:`ofg_loss`: the paper's Eq. 3 data term, ``MSE(pred, stop_gradient(refine(pred)))``;
- :func:`similarity_loss`: the unsupervised data term, ``-NCC(fixed, moving∘pred)``
  (or MSE);
- :func:`registration_loss`: the loss of a batch, either mode plus ``Grad(pred)``,
  with the paper's OFG-intensity ablations (:class:`Intensity`) mixing the two
  per pair.
"""

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp

from ofg_jax.refine import refine
from ofg_jax.refine import registration_energy
from ofg_jax.regularizers import grad_loss

MODES = ("ofg", "unsupervised")


def ofg_loss(moving: jax.Array, fixed: jax.Array, pred_disp: jax.Array,
             **refine_kwargs) -> jax.Array:
    """OFG's supervision loss (Eq. 3) ``mean((pred - stop_gradient(refine(pred)))**2)``.

    The refined field is a constant target, so the gradient with respect to
    ``pred_disp`` is ``2 * (pred - target) / pred.size``.

    Args:
      moving, fixed: ``(*S)`` images.
      pred_disp: ``(*S, N)`` the network's predicted displacement, in voxels.
      **refine_kwargs: keyword options of :func:`ofg_jax.refine`.

    Returns:
      Scalar loss, in voxels squared.
    """
    target = jax.lax.stop_gradient(refine(moving, fixed, pred_disp, **refine_kwargs))
    return jnp.mean((pred_disp - target) ** 2)


def similarity_loss(moving: jax.Array, fixed: jax.Array, disp: jax.Array, *,
                    similarity: str = "ncc") -> jax.Array:
    """The unsupervised data term: ``-NCC(fixed, moving∘disp)``, or the MSE.

    Args:
      moving, fixed: ``(*S)`` images.
      disp: ``(*S, N)`` displacement in voxels.
      similarity: ``"ncc"`` or ``"mse"``.

    Returns:
      Scalar loss.
    """
    return registration_energy(moving, fixed, disp, reg_weight=0.0,
                               similarity=similarity)


@dataclasses.dataclass(frozen=True)
class Intensity:
    """How much OFG supervision a run gets: the paper's intensity ablation.

    Pairs without an OFG target are trained with the unsupervised loss. The
    defaults are plain OFG (every pair, every epoch, no added similarity term).

    Attributes:
      every_epochs: OFG targets only in the epochs ``e`` with ``e % k == 0``.
      fraction: probability that a pair gets an OFG target (drawn per pair).
      ncc_weight: ``w``: adds ``w * similarity_loss`` to the loss of OFG pairs.
    """
    every_epochs: int = 1
    fraction: float = 1.0
    ncc_weight: float = 0.0

    @classmethod
    def from_config(cls, ofg_config: Any) -> "Intensity":
        """From ``config.ofg``; absent keys (older configs) are plain OFG."""
        return cls(**{field.name: ofg_config[field.name]
                      for field in dataclasses.fields(cls) if field.name in ofg_config})

    def validate(self) -> None:
        """Raises ``ValueError`` naming the first invalid ``ofg.*`` setting."""
        if not (isinstance(self.every_epochs, int) and self.every_epochs >= 1):
            raise ValueError(f"invalid config: ofg.every_epochs={self.every_epochs!r}; "
                             "expected an integer >= 1")
        if not 0 <= self.fraction <= 1:
            raise ValueError(f"invalid config: ofg.fraction={self.fraction!r}; "
                             "expected a number in [0, 1]")
        if not self.ncc_weight >= 0:
            raise ValueError(f"invalid config: ofg.ncc_weight={self.ncc_weight!r}; "
                             "expected a number >= 0")

    def guided_pairs(self, epoch: jax.Array, key: jax.Array,
                     batch_size: int) -> Optional[jax.Array]:
        """``(B,)`` bool: the pairs of a batch that get an OFG target; None = all.

        Args:
          epoch: the 0-based epoch of the update (may be traced).
          key: the random key of the per-pair draws of ``fraction``.
          batch_size: B.
        """
        if self.every_epochs == 1 and self.fraction == 1:
            return None
        use = jnp.broadcast_to(epoch % self.every_epochs == 0, (batch_size,))
        if self.fraction < 1:
            use = use & jax.random.bernoulli(key, self.fraction, (batch_size,))
        return use


def registration_loss(pred: jax.Array, moving: jax.Array, fixed: jax.Array, *,
                      mode: str, reg_weight: float, similarity: str = "ncc",
                      targets: Optional[jax.Array] = None, ncc_weight: float = 0.0,
                      use_ofg: Optional[jax.Array] = None,
                      unsupervised_reg_weight: float = 1.0
                      ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The model loss of a batch of predictions.

    Args:
      pred: ``(B, *S, N)`` predicted displacements in voxels.
      moving, fixed: ``(B, *S)`` images.
      mode: "ofg": ``MSE(pred, stop_gradient(targets)) + reg_weight * Grad(pred)``
        (Eq. 3); "unsupervised": ``similarity_loss + reg_weight * Grad(pred)``.
      reg_weight: weight of the Grad regulariser.
      similarity: the unsupervised similarity term, "ncc" or "mse".
      targets: "ofg" mode: ``(B, *S, N)`` pseudo labels, e.g. the refined
        predictions.
      ncc_weight: "ofg" mode: adds ``ncc_weight * similarity_loss`` to the loss
        of every OFG pair.
      use_ofg: "ofg" mode: ``(B,)`` booleans (or None = all); pairs where False
        get the unsupervised loss with ``unsupervised_reg_weight`` instead.
      unsupervised_reg_weight: Grad weight of the pairs where ``use_ofg`` is False.

    Returns:
      The scalar loss (batch mean) and its terms ``{"similarity", "grad"}``
      (with ``ncc_weight`` or ``use_ofg`` also ``ofg_fraction``, the fraction of
      pairs with an OFG target).
    """
    unsupervised_term = lambda: jax.vmap(
        lambda m, f, p: similarity_loss(m, f, p, similarity=similarity))(
            moving, fixed, pred)
    if mode == "ofg":
        if targets is None:
            raise ValueError("mode 'ofg' needs the targets")
        targets = jax.lax.stop_gradient(targets)
        ofg_term = jnp.mean((pred - targets) ** 2, axis=tuple(range(1, pred.ndim)))
        if use_ofg is not None or ncc_weight:
            unsupervised = unsupervised_term()
            use = jnp.broadcast_to(jnp.asarray(True if use_ofg is None else use_ofg),
                                   ofg_term.shape)
            smoothness = jax.vmap(grad_loss)(pred)
            data = jnp.where(use, ofg_term + ncc_weight * unsupervised, unsupervised)
            weight = jnp.where(use, reg_weight, unsupervised_reg_weight)
            loss = jnp.mean(data + weight * smoothness)
            return loss, {"similarity": jnp.mean(data), "grad": jnp.mean(smoothness),
                          "ofg_fraction": jnp.mean(use.astype(jnp.float32))}
        data_term = jnp.mean(ofg_term)
    elif mode == "unsupervised":
        data_term = jnp.mean(unsupervised_term())
    else:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    smoothness = jnp.mean(jax.vmap(grad_loss)(pred))
    loss = data_term + reg_weight * smoothness
    return loss, {"similarity": data_term, "grad": smoothness}
