"""CSE-AutoLoss (convergence-simulation driven search) for detection: published losses (`published`), their use on a
Faster R-CNN box head (`losses`), the convergence-property checks (`convergence`), the model-optimisation simulation
(`simulation`), the `cse:` settings (`config`) and the search method `cse` (`method`)."""
