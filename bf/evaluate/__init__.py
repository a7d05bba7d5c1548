"""``bf eval``: prompt faithfulness (shapes detector) and fidelity against a reference model."""
