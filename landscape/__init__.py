"""landscape — loss-landscape sharpness of LoRA models in the LoRA, merged, tangent and normal spaces.

Imports :mod:`flatlora`, never the other way round.
"""
