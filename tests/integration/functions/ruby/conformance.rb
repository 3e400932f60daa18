# frozen_string_literal: true

# The conformance function; every runtime has a twin with the same actions.

class ConformanceError < StandardError; end

$invocations = 0

def handler(event:, context:)
  $invocations += 1
  case event['action']
  when 'echo' then { echo: event['payload'] }
  when 'count' then { count: $invocations }
  when 'log'
    puts "conformance log #{event['message']}"
    { logged: true }
  when 'error' then raise ConformanceError, event['message']
  when 'sleep'
    sleep(event['seconds'])
    { slept: event['seconds'] }
  when 'crash' then exit!(3)
  when 'big' then { data: 'x' * event['size'] }
  when 'context'
    {
      requestId: context.aws_request_id,
      remainingMs: context.get_remaining_time_in_millis,
      functionName: context.function_name,
      functionVersion: context.function_version,
      memoryMB: context.memory_limit_in_mb.to_i,
      invokedFunctionArn: context.invoked_function_arn,
      logGroupName: context.log_group_name,
      logStreamName: context.log_stream_name
    }
  else raise ArgumentError, "unknown action #{event['action']}"
  end
end

module Greeter
  # A class-level handler: `conformance.Greeter::Polite.greet`.
  class Polite
    def self.greet(event:, context:)
      { greeting: "Good day, #{event['name']}" }
    end
  end
end

def identity(event:, context:)
  { clientContext: context.client_context, identity: context.identity, trace: ENV.fetch('_X_AMZN_TRACE_ID', nil) }
end
