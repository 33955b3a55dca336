"""hw3lib: the helper package of the HW3 captioning workbook (NTU DLCV Fall 2024, homework 3).

Modules, one concept each: ``data`` (caption sets, images), ``tokenizer`` (GPT-2 BPE), ``decoder`` (the course's
GPT-2), ``captioner`` (ViT + projection + LoRA decoder), ``captioner_decoding`` (its greedy and beam search),
``train`` (its training loop), ``llava/`` (zero-shot LLaVA-1.5 captioning, a module per concept), ``attention``
(per-word attention maps, the layer shown), ``cider`` (CIDEr-D), ``metrics`` (CLIPScore, the course's evaluate),
``ptb`` (the PTB tokenizer without Java), ``hub`` (models by name through the Hugging Face cache), ``viz``
(figures), ``outputs`` (what the notebooks hand each other), ``params`` (a notebook's parameters), ``workbook``
(papermill runner), ``kernel`` (the Jupyter kernel, ``hw3 lab``), ``demo`` (the shapes world, caption and pointing
accuracy, the stand-in models), ``rehearsal`` (the hw3 profile with random weights at the real sizes and COCO-like
data), ``cli`` (the ``hw3`` command).
"""
