"""The models the demo can train (``--models``, on the emoji catalog or on your own images with ``--data``): each
one's recipe, the sampler and guidance it is scored and exported with, its description for the model card, and
where its export goes."""
from __future__ import annotations

from pathlib import Path

# Config overrides of the quick variant's training runs. 440 UNet steps are too few for the full recipe's cosine
# decay to 0.1x (there to keep 1,400+ steps stable): a constant lr after warm-up, as `alpha_f: 1.0`.
QUICK_OVERRIDES = {'microdit-flow': [], 'unet': ['scheduler.alpha_f=1.0'], 'microdit': []}
# Each model's recipe and the sampler and guidance the demo scores it with: first-order samplers (one network call
# per step; Heun takes two and doubles the time of the evaluation stage); guidance 3 as the equal-compute study
# (for the flow-matching MicroDiT it scored FID 227.9 against 235.7 at the schedule's default 7, same checkpoint),
# 5 for the EDM MicroDiT (its schedule's default). The first model is the default.
MODELS = {'microdit-flow': ('yamls/demo/microdit-flow.yaml', 'euler', 3.0),
          'unet': ('yamls/demo/unet.yaml', 'ddim', 3.0),
          'microdit': ('yamls/demo/microdit.yaml', 'euler', 5.0)}
DEFAULT_MODELS = ['microdit-flow']
DESCRIPTIONS = {
    'microdit-flow': 'A mini MicroDiT (8.8M parameters) trained with flow matching',
    'unet': "A mini CommonCanvas-S (SD2-layout UNet, 9.4M parameters) trained with SD2's DDPM (v target, zero "
            'terminal SNR)',
    'microdit': 'A mini MicroDiT (8.8M parameters) trained with EDM and deferred patch masking'}


def steps_key(model: str) -> str:
    """The profile key (and ``--<key>`` option) of a model's training steps (``microdit_flow_steps``)."""
    return f'{model.replace("-", "_")}_steps'


def export_folder(root: Path, name: str) -> Path:
    """Where the demo exports a model: a diffusers pipeline for the UNet, a native export for MicroDiT (diffusers
    has no pipeline that runs it)."""
    return root / name / ('pipeline' if name == 'unet' else 'export')


def export_command(py: str, name: str, sampler: str, steps: int, guidance: float) -> tuple[list[str], str]:
    """The command that exports a model (without ``--checkpoint``/``--out``) and the file that marks it done: a
    diffusers pipeline for the UNet; for MicroDiT the native export, whose generation defaults are the settings the
    model was evaluated at."""
    if name == 'unet':  # diffusers' StableDiffusionPipeline takes a UNet backbone
        return [py, 'convert/export_diffusers.py'], 'model_index.json'
    return [py, '-m', 'diffusion.export.native', '--sampler', sampler, '--steps', str(steps), '--guidance',
            str(guidance)], 'config.json'
