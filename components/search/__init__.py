"""The search core, independent of any task: operators, loss graphs and their JSON/exports, tree generation,
evolution, the loss-rejection screening, the gradient-equivalence cache, the ask/tell search engine."""
