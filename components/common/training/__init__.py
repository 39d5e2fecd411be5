"""The training skeleton the SFT and DPO steps share; owned by neither.

A training step reads like a recipe: load the data and the processor, build the model (``model``), its
TrainingArguments (``arguments``), train with checkpoints published to object storage (``checkpoints``),
then write the artifact (``outputs``). ``config.TrainingConfig`` holds the settings both steps take;
``collator`` decides which tokens carry loss; ``distributed`` holds the rank helpers of a multi-process run
(rank 0 downloads and publishes, the others wait).
"""
