"""Collection, training and evaluation of length predictors (`lenpred collect|train|eval`)."""
