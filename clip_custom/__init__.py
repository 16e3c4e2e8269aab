"""Our own CLIP: ViT and ModifiedResNet image towers, text transformer, tokenizer, loading."""
from .loading import available_models, load, load_state_dict_any
from .model import CLIP, build_model
from .preprocess import preprocess_tensor, transform
from .tokenizer import SimpleTokenizer, tokenize

__all__ = ["CLIP", "SimpleTokenizer", "available_models", "build_model", "load",
           "load_state_dict_any", "preprocess_tensor", "tokenize", "transform"]
