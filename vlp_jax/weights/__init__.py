"""Foreign weights: safetensors files (no pickle) and the OpenAI CLIP / open_clip layout."""
