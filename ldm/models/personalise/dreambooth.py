"""DreamBooth (Ruiz et al. 2023): fine-tune the whole denoiser on a few images of one subject bound
to a rare token ("a sks triangle"), with the class prior preserved by the model's own images.

Not an adapter: :class:`DreamBooth` is a :class:`LatentDiffusion` whose checkpoints hold the whole
model, started from a base model's weights through ``ckpt_path`` and exported for inference with
``scripts/export_weights.py``. What it adds is one factor in the diffusion loss: each batch item
carries a ``loss_weight`` (see :mod:`ldm.data.prior_preservation`: 1 for instance examples,
``prior_loss_weight`` for class examples), which multiplies that item's loss. The loss is the mean
over the batch, so a batch of n instance and n class examples gives
(instance loss + prior_loss_weight * class loss) / 2: diffusers' sum halved, a constant factor
that Adam's update does not see. With every weight 1, or batches without ``loss_weight``, the
loss is LatentDiffusion's to the bit.

``trainable``: which U-Net parameters fine-tune, by name. ``None`` (DreamBooth) trains them all; a list
of name fragments trains only the parameters whose name contains one of them, e.g. the cross-attention
key and value projections (``["attn2.to_k", "attn2.to_v"]``: Custom Diffusion, Kumari et al. 2023),
which bind the new token with far fewer weights able to move the rest of the model.
"""
import logging

from ldm.data.prior_preservation import LOSS_WEIGHT_KEY, merge_prior_examples
from ldm.errors import UserError
from ldm.models.diffusion.latent_diffusion import LatentDiffusion

logger = logging.getLogger(__name__)


class DreamBooth(LatentDiffusion):
    """LatentDiffusion with per-item loss weights from ``batch[loss_weight_key]``.

    ``train_text_encoder``: also fine-tune the text encoder (DreamBooth's "train_text_encoder");
    by default only the U-Net trains and the text encoder stays frozen. It sets LatentDiffusion's
    ``cond_stage_trainable``, which a base model's inference config may also name (``false``).
    Batches of :class:`ldm.data.prior_preservation.PriorPreservationDataset` are merged into one
    batch (instance examples, then class examples) at the start of each training and validation
    step, so caption dropout (``ucg_training``) reaches both kinds.
    """

    def __init__(self, *args, train_text_encoder=False, loss_weight_key=LOSS_WEIGHT_KEY, trainable=None, **kwargs):
        given = kwargs.pop("cond_stage_trainable", None)
        if given is not None and bool(given) != bool(train_text_encoder):
            logger.info("DreamBooth: train_text_encoder=%s decides whether the text encoder trains "
                        "(the config's cond_stage_trainable=%s is not used)", train_text_encoder, given)
        super().__init__(*args, cond_stage_trainable=bool(train_text_encoder), **kwargs)
        self.train_text_encoder = bool(train_text_encoder)
        self.loss_weight_key = loss_weight_key
        self.trainable = None if trainable is None else [str(fragment) for fragment in trainable]
        if self.trainable is not None:
            self._freeze_all_but(self.trainable)

    def _freeze_all_but(self, fragments):
        if not fragments:
            raise UserError("DreamBooth: trainable is an empty list; leave it out to train the whole U-Net")
        chosen = 0
        for name, param in self.model.named_parameters():
            keep = any(fragment in name for fragment in fragments)
            param.requires_grad_(keep)
            chosen += keep
        if not chosen:
            raise UserError(f"DreamBooth: trainable={fragments} names no U-Net parameter "
                             f"(names look like {next(iter(dict(self.model.named_parameters())))!r})")
        logger.info("DreamBooth: fine-tuning %d U-Net tensors named by %s", chosen, fragments)

    def trainable_parameters(self):
        params = super().trainable_parameters()
        if self.trainable is None:
            return params
        return [param for param in params if param.requires_grad]

    def training_step(self, batch, batch_idx):
        return super().training_step(merge_prior_examples(batch), batch_idx)

    def validation_step(self, batch, batch_idx):
        return super().validation_step(merge_prior_examples(batch), batch_idx)

    def shared_step(self, batch, **kwargs):
        with self.item_loss_weights(batch.get(self.loss_weight_key), self.loss_weight_key):
            return super().shared_step(batch, **kwargs)
