"""SGLang engine side: launch flags from configuration (launcher) and subprocess supervision (process)."""
