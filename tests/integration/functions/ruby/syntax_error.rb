# Deliberately broken: loading it is an init error (Init<SyntaxError>).
def handler(event:, context:
  1
end
