package example;

import com.amazonaws.services.lambda.runtime.Context;
import com.amazonaws.services.lambda.runtime.RequestHandler;
import java.util.Map;

/** Fails in its static initializer: an init error. */
public class InitFails implements RequestHandler<Map<String, Object>, String> {
    static {
        if (Boolean.TRUE) {
            throw new ConformanceError("init failed");
        }
    }

    @Override
    public String handleRequest(Map<String, Object> event, Context context) {
        return "unreachable";
    }
}
