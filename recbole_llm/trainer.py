"""Trainers for the models that need their own (``<Model>Trainer``); every other model uses RecBole's."""
