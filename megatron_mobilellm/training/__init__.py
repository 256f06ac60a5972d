"""The trainer's parts, which ``pretrain.py`` puts together.

``arguments`` (the CLI) fills the typed configs of ``config``; ``distributed`` joins the process group; ``engine``
builds the DeepSpeed engine with ``optimizer``, ``lr_scheduler``, ``ds_config``, ``guard`` and ``zero_overflow``;
``loop`` trains, logging through ``metrics`` and saving/resuming through ``checkpointing``.
"""
