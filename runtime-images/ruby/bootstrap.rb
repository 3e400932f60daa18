# frozen_string_literal: true

# lambdalet's Ruby runtime: a Lambda Runtime API client using only Ruby's standard library.
#
# Loads the handler named by _HANDLER (`file.method` or `file.Module::Class.method`) from LAMBDA_TASK_ROOT,
# then loops: GET /next, call `handler(event:, context:)`, POST /response or /error. Error shapes and
# exit rules follow AWS's Ruby runtime interface client: errors are `{errorMessage, errorType, stackTrace}`
# with errorType `Function<Class>` (handler), `Init<Class>` (loading); a StandardError keeps the
# environment, any other exception (NoMethodError, NameError, SystemExit ...) is reported and the runtime
# exits.

require 'json'
require 'net/http'
require 'stringio'

$stdout.sync = true
$stderr.sync = true

# The Runtime API client: next, respond, fail, init_error over one keep-alive connection.
class RuntimeClient
  BASE = '/2018-06-01/runtime'

  def initialize(address)
    host, _, port = address.rpartition(':')
    @http = Net::HTTP.new(host, Integer(port))
    @http.keep_alive_timeout = 3600
    @http.read_timeout = nil # GET /next blocks until an event arrives
    @http.start
  end

  def next_invocation
    response = request(Net::HTTP::Get.new("#{BASE}/invocation/next"))
    raise "GET /next returned #{response.code}: #{response.body}" unless response.code == '200'

    response
  end

  def respond(request_id, body, content_type)
    post("#{BASE}/invocation/#{request_id}/response", body, content_type)
  end

  def fail(request_id, error)
    post("#{BASE}/invocation/#{request_id}/error", JSON.generate(error.to_lambda_response), 'application/json',
         error.runtime_error_type)
  end

  def init_error(error)
    post("#{BASE}/init/error", JSON.generate(error.to_lambda_response), 'application/json', error.runtime_error_type)
  end

  private

  def post(path, body, content_type, error_type = nil)
    req = Net::HTTP::Post.new(path)
    req['Content-Type'] = content_type
    req['Lambda-Runtime-Function-Error-Type'] = error_type if error_type
    req.body = body
    response = request(req)
    warn("lambdalet: POST #{path} returned #{response.code}: #{response.body}") unless response.code == '202'
    response
  end

  def request(req)
    attempts = 0
    begin
      attempts += 1
      @http.request(req)
    rescue EOFError, Errno::ECONNRESET, Errno::EPIPE, IOError
      raise if attempts > 1

      # The server closed an idle keep-alive connection; one fresh connection is worth a try.
      @http.finish if @http.started?
      @http.start
      retry
    end
  end
end

# An error as Lambda reports it; `classification` is Function, Init or Runtime.
class LambdaError < StandardError
  STANDARD = %w[ArgumentError NoMethodError Exception StandardError NameError LoadError SystemExit
                SystemStackError].freeze
  OWN_FILE = File.expand_path(__FILE__)

  def initialize(original, classification = 'Function')
    @error_class = original.class.to_s
    @error_type = "#{classification}<#{original.class}>"
    # Ruby's error_highlight appends a snippet of the calling code (ours) to NameError messages.
    @error_message = original.respond_to?(:original_message) ? original.original_message : original.message
    # The bootstrap's own frames are not the user's: stop at the first one.
    locations = original.backtrace_locations || []
    @stack_trace = locations.first(100).take_while { |line| line.absolute_path != OWN_FILE }.map(&:to_s)
    super(@error_message)
  end

  # The error type header: the class for Ruby's own error classes, a generic one for user classes.
  def runtime_error_type
    STANDARD.include?(@error_class) ? @error_type : 'Function<UserException>'
  end

  def to_lambda_response
    { errorMessage: @error_message, errorType: @error_type, stackTrace: @stack_trace }
  end
end

# The context object a handler receives.
class LambdaContext
  attr_reader :aws_request_id, :invoked_function_arn, :log_group_name, :log_stream_name, :function_name,
              :memory_limit_in_mb, :function_version, :identity, :tenant_id, :client_context, :deadline_ms

  def initialize(response)
    @deadline_ms = response['Lambda-Runtime-Deadline-Ms'].to_i
    @aws_request_id = response['Lambda-Runtime-Aws-Request-Id']
    @invoked_function_arn = response['Lambda-Runtime-Invoked-Function-Arn']
    @log_group_name = ENV.fetch('AWS_LAMBDA_LOG_GROUP_NAME', nil)
    @log_stream_name = ENV.fetch('AWS_LAMBDA_LOG_STREAM_NAME', nil)
    @function_name = ENV.fetch('AWS_LAMBDA_FUNCTION_NAME', nil)
    @memory_limit_in_mb = ENV.fetch('AWS_LAMBDA_FUNCTION_MEMORY_SIZE', nil)
    @function_version = ENV.fetch('AWS_LAMBDA_FUNCTION_VERSION', nil)
    @identity = parse(response['Lambda-Runtime-Cognito-Identity'])
    @client_context = parse(response['Lambda-Runtime-Client-Context'])
    @tenant_id = response['Lambda-Runtime-Aws-Tenant-Id'] unless response['Lambda-Runtime-Aws-Tenant-Id'].to_s.empty?
  end

  def get_remaining_time_in_millis # rubocop:disable Naming/AccessorMethodName (Lambda's name)
    remaining = @deadline_ms - Process.clock_gettime(Process::CLOCK_REALTIME, :millisecond)
    remaining.positive? ? remaining : 0
  end

  private

  def parse(text)
    JSON.parse(text) unless text.to_s.empty?
  end
end

# The user's handler, from `file.method` or `file.Module::Class.method`.
class Handler
  def initialize(spec)
    parts = spec.split('.')
    case parts.size
    when 2 then @file, @method = parts
    when 3 then @file, @receiver, @method = parts
    else
      raise ArgumentError, "Invalid handler #{parts}, must be of form FILENAME.METHOD or FILENAME.CLASS.METHOD " \
                           'where FILENAME corresponds with an existing Ruby source file FILENAME.rb, CLASS is an ' \
                           'optional module/class namespace and METHOD is a callable method. If using CLASS, ' \
                           'METHOD must be a class-level method.'
    end
  end

  def load(task_root)
    $LOAD_PATH.unshift(task_root) unless $LOAD_PATH.include?(task_root)
    require @file
  end

  def call(event, context)
    target = @receiver ? Kernel.const_get(@receiver) : TOPLEVEL_BINDING.receiver
    target.__send__(@method, event: event, context: context)
  end
end

def response_body(result)
  case result
  when StringIO, IO then [result.read, 'application/unknown']
  else [result.to_json, 'application/json']
  end
end

def main
  client = RuntimeClient.new(ENV.fetch('AWS_LAMBDA_RUNTIME_API'))
  task_root = ENV.fetch('LAMBDA_TASK_ROOT', Dir.pwd)
  begin
    handler = Handler.new(ENV.fetch('_HANDLER', ''))
    handler.load(task_root)
  rescue Exception => e # rubocop:disable Lint/RescueException (LoadError, SyntaxError, any static code error)
    error = LambdaError.new(e, 'Init')
    puts "Init error when loading handler #{ENV.fetch('_HANDLER', '')}"
    puts JSON.pretty_generate(error.to_lambda_response)
    client.init_error(error)
    exit!(1)
  end

  loop do
    response = client.next_invocation
    request_id = response['Lambda-Runtime-Aws-Request-Id']
    ENV['_X_AMZN_TRACE_ID'] = response['Lambda-Runtime-Trace-Id'] if response['Lambda-Runtime-Trace-Id']
    event = response['Content-Type'] == 'application/json' ? JSON.parse(response.body) : response.body
    begin
      body, content_type = response_body(handler.call(event, LambdaContext.new(response)))
    rescue StandardError => e
      critical = e.is_a?(NameError) # NoMethodError included: the handler cannot work, start afresh
      error = LambdaError.new(e)
      puts(critical ? 'Critical exception from handler' : 'Error raised from handler method')
      puts JSON.pretty_generate(error.to_lambda_response)
      client.fail(request_id, error)
      exit!(255) if critical
      next
    rescue Exception => e # rubocop:disable Lint/RescueException (SystemExit, SystemStackError ...: fatal)
      error = LambdaError.new(e)
      puts 'Critical exception from handler'
      puts JSON.pretty_generate(error.to_lambda_response)
      client.fail(request_id, error)
      exit!(255)
    end
    client.respond(request_id, body, content_type)
  end
end

main if $PROGRAM_NAME == __FILE__
