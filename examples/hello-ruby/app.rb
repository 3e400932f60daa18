# frozen_string_literal: true

# Returns a greeting for event["name"].
def handler(event:, context:)
  name = event.is_a?(Hash) && event['name'] ? event['name'] : 'world'
  puts "greeting #{name}"
  { message: "Hello, #{name}!" }
end
