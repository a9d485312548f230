"""AdamW with linear warmup + cosine decay, global-norm clipping, and no decay on norms, biases or temperature."""

import jax
import ml_collections
import optax


def learning_rate_schedule(train: ml_collections.ConfigDict) -> optax.Schedule:
    """Linear warmup from 0 to the peak, then cosine decay to `end_learning_rate_ratio` × peak at the last step."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=train.learning_rate,
        warmup_steps=train.warmup_steps,
        decay_steps=max(train.steps, train.warmup_steps + 1),
        end_value=train.learning_rate * train.end_learning_rate_ratio,
    )


def decay_mask(params):
    """Weight decay only on matrices and embeddings (ndim >= 2); not on norms, biases or the temperature."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(train: ml_collections.ConfigDict) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(train.grad_clip_norm),
        optax.adamw(
            learning_rate_schedule(train),
            b1=train.b1,
            b2=train.b2,
            eps=train.eps,
            weight_decay=train.weight_decay,
            mask=decay_mask,
        ),
    )
