"""Model assembly: configs, building blocks, the mixer registry and the decoder LM."""

from research.models.config import ModelConfig
from research.models.registry import MixerContext, available_mixers, get_mixer, parse_layer_spec, register_mixer
from research.models.transformer import DecoderBlock, DecoderLM, token_cross_entropy

__all__ = ["ModelConfig", "MixerContext", "DecoderBlock", "DecoderLM", "available_mixers", "get_mixer",
           "parse_layer_spec", "register_mixer", "token_cross_entropy"]
