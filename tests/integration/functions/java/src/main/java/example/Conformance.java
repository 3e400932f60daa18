package example;

import com.amazonaws.services.lambda.runtime.Context;
import com.amazonaws.services.lambda.runtime.RequestHandler;
import java.util.LinkedHashMap;
import java.util.Map;

/** The conformance function (RequestHandler over JSON maps); every runtime has a twin with the same actions. */
public class Conformance implements RequestHandler<Map<String, Object>, Map<String, Object>> {
    private static int invocations = 0;

    @Override
    public Map<String, Object> handleRequest(Map<String, Object> event, Context context) {
        invocations += 1;
        Map<String, Object> out = new LinkedHashMap<>();
        String action = String.valueOf(event.get("action"));
        switch (action) {
            case "echo":
                out.put("echo", event.get("payload"));
                return out;
            case "log":
                System.out.println("conformance log " + event.get("message"));
                out.put("logged", true);
                return out;
            case "count":
                out.put("count", invocations);
                return out;
            case "error":
                throw new ConformanceError(String.valueOf(event.get("message")));
            case "sleep":
                double seconds = ((Number) event.get("seconds")).doubleValue();
                try {
                    Thread.sleep((long) (seconds * 1000));
                } catch (InterruptedException e) {
                    Thread.currentThread().interrupt();
                }
                out.put("slept", event.get("seconds"));
                return out;
            case "crash":
                System.exit(3);
                return out;
            case "big":
                out.put("data", "x".repeat(((Number) event.get("size")).intValue()));
                return out;
            case "context":
                out.put("requestId", context.getAwsRequestId());
                out.put("remainingMs", context.getRemainingTimeInMillis());
                out.put("functionName", context.getFunctionName());
                out.put("functionVersion", context.getFunctionVersion());
                out.put("memoryMB", context.getMemoryLimitInMB());
                out.put("invokedFunctionArn", context.getInvokedFunctionArn());
                out.put("logGroupName", context.getLogGroupName());
                out.put("logStreamName", context.getLogStreamName());
                return out;
            default:
                throw new IllegalArgumentException("unknown action " + action);
        }
    }
}
