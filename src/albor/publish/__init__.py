"""Hub-ready folders of the ladder's models, and their upload: the library behind the `publish`
stage (`albor.stages.publish`).

`layout` decides which files of which artifacts make each variant folder and guards an existing
output; `card` writes the model card (huggingface_hub's `ModelCard`, evaluation results in its
metadata) from the workdir's evaluate stages; `upload` sends the folders to a Hub endpoint.
"""
