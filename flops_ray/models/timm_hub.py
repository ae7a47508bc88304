"""timm models by name, with timm's own pretrained weights read through the Hugging Face cache when asked.

timm maps a model name to a hub repository (``timm.models.get_pretrained_cfg(name).hf_hub_id``) and reads
its weights with ``huggingface_hub``: ``HF_HOME`` says where the cache is, and ``HF_HUB_OFFLINE=1`` reads
only the cache. Only the driver asks for weights; replicas receive the driver's model.
"""

from __future__ import annotations

import timm
from huggingface_hub import constants
from huggingface_hub.errors import LocalEntryNotFoundError
from torch import nn


class HubWeightsError(FileNotFoundError):
    """A timm model's pretrained weights are not in the Hugging Face cache, and the hub was not reached."""


def timm_model(name: str, num_classes: int, img_size: int, pretrained: bool = False, **kwargs) -> nn.Module:
    """timm's model ``name`` with ``num_classes`` outputs; with ``pretrained``, timm's hub weights.

    timm's own ``pretrained=True`` path loads them, adapting them as timm does: a classifier for another
    number of classes is left out (the model keeps its freshly initialised head), and position embeddings
    are resampled to ``img_size``.

    Raises:
        HubWeightsError: the weights are not in the cache (``HF_HOME``) and could not be downloaded.
    """
    try:
        return timm.create_model(name, pretrained=pretrained, num_classes=num_classes, img_size=img_size, **kwargs)
    except LocalEntryNotFoundError:
        # One message naming the model and the cache, not huggingface_hub's traceback of a cache miss.
        raise HubWeightsError(_missing(name)) from None


def _missing(name: str) -> str:
    cfg = timm.models.get_pretrained_cfg(name)
    repo = getattr(cfg, "hf_hub_id", None) or name
    why = "HF_HUB_OFFLINE=1 forbids downloading" if constants.HF_HUB_OFFLINE else "the hub could not be reached"
    return (
        f"pretrained weights of {name} (hub repository {repo}) are not in the Hugging Face cache "
        f"{constants.HF_HUB_CACHE} (HF_HOME={constants.HF_HOME}) and {why}: fill a cache on a machine with "
        f"internet (timm.create_model({name!r}, pretrained=True)) and copy it to HF_HOME, or point HF_HOME at one"
    )
