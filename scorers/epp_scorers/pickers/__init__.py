"""Pickers: plugins deriving from `epp.framework.Picker` (the in-tree ones from
`pickers.base.BasePicker`). `pick(cycle, endpoints, scores)` turns the candidates' total scores into
the chosen endpoints, primary first, then up to `maxNumOfEndpoints - 1` fallbacks."""
