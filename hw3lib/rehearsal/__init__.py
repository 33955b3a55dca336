"""The rehearsal of the real assignment: the hw3 profile exactly as ``configs/hw3.yaml`` states it, with random
weights at the real architectures stored in a Hugging Face cache under the real repo ids, and COCO-like data in the
real layout. It proves the student's path on a GPU machine before anyone downloads 20 GB (``hw3 rehearse``).

* :mod:`.hub_cache`: files into the hub cache's documented layout (also used by the tests).
"""
