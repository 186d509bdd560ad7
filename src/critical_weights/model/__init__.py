"""The model under study: what `model.name` refers to (source), loading it on a device and dtype
with every weight checked (loading), its tokenizer (tokenization), the integrity of its weight
files (weight_files), the converted-GGUF cache (gguf_cache), which parameters make up a block
and a component (layout), and the MLP output projections whose activations superweights watches
(projections).
"""
