"""Class images for DreamBooth's prior preservation, drawn by the model that is to be fine-tuned.

They go into a captioned folder (``00000.png`` + ``00000.txt`` with the prompt; see
:mod:`ldm.data.captioned_folder`), which :class:`ldm.data.captioned_folder.CaptionedImageFolder`
reads back for training. Like diffusers' and kohya's DreamBooth scripts, a folder that already
holds some of the images only gets the missing ones, so a run can be stopped and continued, or
asked for more images later.
"""
import logging

import numpy as np

from ldm.data.captioned_folder import is_written, write_captioned_image
from ldm.errors import UserError

log = logging.getLogger(__name__)


def image_stem(index):
    return f"{index:05}"


def missing_indices(folder, count):
    """Indices below ``count`` whose image or caption is not in ``folder`` yet."""
    return [i for i in range(count) if not is_written(folder, image_stem(i))]


# Redrawn images take seeds this far apart, beyond any class-image count, so no redraw repeats another image's seed.
REDRAW_SEED_STRIDE = 1_000_003


def generate_class_images(model, prompts, folder, count, *, batch_size=4, seed=0, accept=None, max_redraws=8,
                          **sampling):
    """Draw ``count`` images with ``model`` into ``folder``: image ``i`` for ``prompts[i % len(prompts)]``
    (one prompt string is a list of one), skipping those already written; returns the new paths.

    ``sampling``: :func:`ldm.generate.txt2img`'s keyword arguments (sampler, steps, scale, ...). Each
    batch is seeded with ``seed`` plus the index of its first image. ``accept(prompt, image) -> bool``
    curates, as people weed out class images that do not show their prompt: a refused image is drawn
    again with another seed, up to ``max_redraws`` times, and then kept (a gap would change the mix of
    prompts); the log says how many were redrawn and how many kept unaccepted.
    """
    from ldm.generate import txt2img
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise UserError("no class prompts given: pass a prompt such as 'a photo of a dog'")
    if int(count) < 1 or int(batch_size) < 1:
        raise UserError(f"the number of class images and the batch size must be positive, got {count} and "
                        f"{batch_size}")
    todo = missing_indices(folder, int(count))
    log.info("class images: %d of %d already in %s, generating %d", count - len(todo), count, folder, len(todo))
    written, redrawn, kept_refused = [], 0, 0
    for start in range(0, len(todo), batch_size):
        pending = todo[start:start + batch_size]
        for attempt in range(int(max_redraws) + 1):
            batch_prompts = [prompts[i % len(prompts)] for i in pending]
            images = txt2img(model, batch_prompts, n_samples=len(pending),
                             seed=seed + pending[0] + attempt * REDRAW_SEED_STRIDE, progress=False, **sampling)
            refused = []
            for index, image, prompt in zip(pending, images, batch_prompts):
                accepted = accept is None or accept(prompt, image)
                if accepted or attempt == max_redraws:
                    kept_refused += not accepted
                    written.append(write_captioned_image(folder, image_stem(index), image, prompt))
                else:
                    refused.append(index)
            redrawn += len(refused)
            pending = refused
            if not pending:
                break
    if accept is not None:
        log.info("class images: %d redrawn, %d kept after %d redraws without being accepted", redrawn,
                 kept_refused, max_redraws)
    return written


def shows_shapes_prompt(prompt, image):
    """Whether a shapes-model image shows every attribute its prompt names (``ldm.data.shapes.describe``):
    the ``accept`` of :func:`generate_class_images` for the shipped model."""
    from ldm.data.shapes import describe, parse_prompt
    seen = describe(image)
    return all(seen.get(key) == value for key, value in parse_prompt(prompt).items())


def with_shapes_phrases(prompts, count, seed=0):
    """``count`` variants of shapes prompts ("a triangle"; variant ``i`` of ``prompts[i % len(prompts)]``),
    each with a position phrase and a background phrase of the shapes vocabulary added with
    probability 1/2, as ``ShapesConcept("instance")`` captions its images: class images then vary
    as the instance images do."""
    from ldm.data.shapes import BACKGROUNDS, POSITION_PHRASES, POSITIONS
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    rng = np.random.default_rng([int(seed), 11])
    variants = []
    for i in range(int(count)):
        variant = prompts[i % len(prompts)]
        if rng.random() < 0.5:
            variant += " " + POSITION_PHRASES[POSITIONS[rng.integers(len(POSITIONS))]]
        if rng.random() < 0.5:
            variant += f" on a {BACKGROUNDS[rng.integers(len(BACKGROUNDS))]} background"
        variants.append(variant)
    return variants
