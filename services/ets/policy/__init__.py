"""Policy side: async client for SGLang's native /generate and the search's StepGenerator on top of it."""
