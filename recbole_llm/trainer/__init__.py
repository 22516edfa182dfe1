"""Trainers for the models that need their own: ``recbole_llm.trainer.<model lowercased>.<Model>Trainer``.

One module per model, named like the model's own file; every other model uses RecBole's trainer.
"""
