"""Divergence: the run stops, says so in one line, and saves nothing diverged.

The step's guard (`steps.train_step`) skips an update whose loss is not
finite, as the official loop skips a NaN loss. That guard alone lets a run
whose weights have blown up skip every later step in silence, evaluate
garbage and checkpoint it. `Watch` reads each step's loss and gradient norm
on the host, one step behind the device (reading a step's metrics waits
for that step only, while the next one is already queued), and stops the
run on the policy of `config.divergence`:

  max_nonfinite_steps  K consecutive steps with a non-finite loss (0: off)
  max_loss_mm          a loss above this, in mm (0: off)
  max_grad_norm        a global gradient norm above this (0: off)

Before every checkpoint the loop checks that all parameters are finite
(`all_finite`) and that the latest step's loss was (a skipped step defers
the save to the next save point). A finite loss does not prove the update
it made was sound: on divergence, the train states saved from the last
finite step on are moved out of `checkpoints/` (`train._diverged`), so a
rerun resumes from one whose next loss was seen to be good.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

# The defaults of `configs/default.py` (also used for a workdir's older
# config.json, written before this policy existed).
DEFAULTS = {'max_nonfinite_steps': 5, 'max_loss_mm': 1e5, 'max_grad_norm': 0.0}


class Diverged(Exception):
  """The run stopped on divergence; the message is one line."""

  def __init__(self, step: int, reason: str, last_finite, checkpoint: str | None,
               set_aside=()):
    self.step, self.reason = step, reason
    self.last_finite, self.checkpoint, self.set_aside = last_finite, checkpoint, set_aside
    loss = (f'last finite loss {last_finite[1]:.1f} mm at step {last_finite[0]}'
            if last_finite else 'no finite loss in this run')
    ckpt = (f'last good checkpoint {checkpoint} (a rerun resumes from it: lower '
            '--config.learning_rate first)' if checkpoint else
            'no good checkpoint (a rerun starts from step 0)')
    aside = (f'; the later ones, whose weights diverged, moved to {", ".join(set_aside)}'
             if set_aside else '')
    super().__init__(f'training diverged at step {step}: {reason}; {loss}; {ckpt}{aside}')


@dataclasses.dataclass(frozen=True)
class Policy:
  max_nonfinite_steps: int = DEFAULTS['max_nonfinite_steps']
  max_loss_mm: float = DEFAULTS['max_loss_mm']
  max_grad_norm: float = DEFAULTS['max_grad_norm']

  @classmethod
  def from_config(cls, config) -> 'Policy':
    fields = dict(DEFAULTS)
    if 'divergence' in config:
      fields.update({k: config.divergence[k] for k in DEFAULTS if k in config.divergence})
    return cls(**fields)


class Watch:
  """Host-side bookkeeping of the steps' losses (see the module doc)."""

  def __init__(self, policy: Policy, start_step: int = 0):
    self.policy = policy
    self.start_step = start_step  # the step the run resumed at
    self.streak = 0  # consecutive steps with a non-finite loss, up to now
    self.last_finite = None  # (step, loss in mm) of the last good step
    self._pending = []  # (step, metrics on the device), oldest first

  def push(self, step: int, metrics) -> None:
    self._pending.append((step, metrics))

  def check(self, lag: int = 0):
    """Reads the metrics of every pending step but the newest `lag`;
    returns `(step, reason)` of the first diverged one, or None."""
    ready = self._pending[:len(self._pending) - lag] if lag else self._pending
    self._pending = self._pending[len(ready):]
    for step, metrics in ready:
      m = jax.device_get({k: metrics[k] for k in ('loss', 'grad_norm')})
      reason = self.observe(step, float(m['loss']), float(m['grad_norm']))
      if reason:
        self._pending = []
        return step, reason
    return None

  def observe(self, step: int, loss: float, grad_norm: float) -> str | None:
    """One step's loss (metres) and gradient norm -> why it diverged, or None."""
    p = self.policy
    if not math.isfinite(loss):
      self.streak += 1
      if p.max_nonfinite_steps and self.streak >= p.max_nonfinite_steps:
        return (f'{self.streak} consecutive steps with a non-finite loss, skipped '
                f'(config.divergence.max_nonfinite_steps={p.max_nonfinite_steps})')
      return None
    self.streak = 0
    loss_mm = 1000 * loss
    if p.max_loss_mm and loss_mm > p.max_loss_mm:
      return (f'loss {loss_mm:.4g} mm above config.divergence.max_loss_mm='
              f'{p.max_loss_mm:g}')
    if p.max_grad_norm and not grad_norm <= p.max_grad_norm:  # NaN too
      return (f'gradient norm {grad_norm:.4g} above config.divergence.max_grad_norm='
              f'{p.max_grad_norm:g}')
    self.last_finite = (step, loss_mm)
    return None


@jax.jit
def _all_finite(tree):
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def all_finite(tree) -> bool:
  """Whether every float leaf of `tree` is finite (one reduction, on device)."""
  return bool(np.asarray(_all_finite(tree)))
