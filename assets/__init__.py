"""Data shipped with EdgeTailor: texts, presets, device profiles, llama.cpp's pre-tokenizer table."""
