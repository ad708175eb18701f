" Syntax of mlxterp query files (.mlxq). Semantic tokens from `mlxterp lsp` add to this
" in Neovim 0.9 and later.
if exists("b:current_syntax")
  finish
endif

syntax keyword mlxqStatement load prompt tokens save lens predict patch with steer let ls stats export info help
syntax keyword mlxqIntervention zero scale clamp noise add replace
syntax keyword mlxqOption in as top plot to clean corrupt metric clear seed
syntax keyword mlxqMetric l2 mse cosine
syntax keyword mlxqFunction mean norm
syntax match mlxqVariable "\$\h\w*"
syntax match mlxqNumber "-\?\<\d\+\(\.\d\+\)\?\([eE][+-]\?\d\+\)\?\>"
syntax match mlxqOperator "[@=+*/]\|\.\."
syntax match mlxqContinuation "\\\s*$"
syntax region mlxqString start=+"+ skip=+\\.+ end=+"\|$+ contains=mlxqEscape oneline
syntax match mlxqEscape +\\["\\ntr0]+ contained
syntax match mlxqComment "#.*$"

highlight default link mlxqStatement Statement
highlight default link mlxqIntervention Function
highlight default link mlxqOption Keyword
highlight default link mlxqMetric Constant
highlight default link mlxqFunction Function
highlight default link mlxqVariable Identifier
highlight default link mlxqNumber Number
highlight default link mlxqOperator Operator
highlight default link mlxqContinuation Special
highlight default link mlxqString String
highlight default link mlxqEscape SpecialChar
highlight default link mlxqComment Comment

let b:current_syntax = "mlxq"
