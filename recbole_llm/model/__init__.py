"""recbole_llm models, one file per model, named after the model lowercased."""
